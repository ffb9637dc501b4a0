"""pgprune: policy-gradient structural pruning of LLaMA-family language models.

``pgprune.prune(model, tokenizer, sparsity=0.3, method="pg", calibration=...)`` returns a
:class:`~pgprune.api.PruneResult` (see :mod:`pgprune.api`); the ``pgprune`` command is :mod:`pgprune.cli`.
Both are imported on first use, so ``import pgprune`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["PruneResult", "__version__", "prune"]


def __getattr__(name: str):
    if name in ("prune", "PruneResult"):
        from pgprune import api

        return getattr(api, name)
    raise AttributeError(f"module 'pgprune' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "prune", "PruneResult"])
