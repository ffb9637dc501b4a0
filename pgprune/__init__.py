"""pgprune: policy-gradient structural pruning of LLaMA-family language models.

``pgprune.prune(model, tokenizer, sparsity=0.3, method="pg", calibration=...)`` returns a
:class:`~pgprune.api.PruneResult` and ``pgprune.recover(result_or_folder, steps=...)`` a
:class:`~pgprune.api.RecoverResult` (see :mod:`pgprune.api`); the ``pgprune`` command is :mod:`pgprune.cli`.
Both are imported on first use, so ``import pgprune`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["PruneResult", "RecoverResult", "__version__", "prune", "recover"]
_API = ("prune", "PruneResult", "recover", "RecoverResult")


def __getattr__(name: str):
    if name in _API:
        from pgprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'pgprune' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
