"""The data stage's work: calibration blocks, held-out texts and offline zero-shot tasks from ``data.*`` settings."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pgprune.errors import MissingFileError, PgpruneError

if TYPE_CHECKING:
    from pgprune.config import Params


def corpus_texts(params: Params) -> tuple[str, dict[str, str]]:
    """(calibration text, {eval corpus name: held-out text})."""
    from pgprune.data import load_hub_text
    from pgprune.data.corpus import interleave, license_text, load_local_corpus

    d = params.data
    local = None
    if d.calibration == "local" or "local" in d.evaluation:
        local = load_local_corpus(d.local_sources, d.heldout_fraction, d.seed)
    max_chars = d.calib_blocks * d.seq_len * 8
    if d.calibration == "local":
        calib = interleave({s: v["calibration"] for s, v in local.items()}, d.seed)
    else:
        calib = load_hub_text(d.calibration, "train", data_files=d.data_files.get(d.calibration), max_chars=max_chars)
    evals = {}
    for name in d.evaluation:
        if name == "local":
            evals["local"] = interleave({s: v["heldout"] for s, v in local.items()}, d.seed)
        elif name == "licenses":
            evals["licenses"] = license_text()
        else:
            split = "validation" if name == "c4" else "test"
            evals[name] = load_hub_text(name, split, data_files=d.data_files.get(name),
                                        max_chars=params.eval.ppl_blocks * d.seq_len * 8 if name == "c4" else None)
    return calib, evals


def prepare_data(params: Params, tokenizer, out_dir: str | Path) -> dict:
    """Write calib.safetensors, eval/<corpus>.txt, tasks/ (offline lm-eval tasks over the held-out text) and
    stats.json: everything deterministic, so a rerun gives the same bytes."""
    from pgprune.data import calibration_blocks
    from pgprune.data.local_tasks import write_local_tasks
    from pgprune.io import save_tensors, write_json, write_text

    d = params.data
    out = Path(out_dir)
    calib_text, evals = corpus_texts(params)
    calib = calibration_blocks(calib_text, tokenizer, d.seq_len, d.calib_blocks, d.seed,
                               source=f"calibration data.calibration={d.calibration!r}", setting="data.seq_len")
    save_tensors(out / "calib.safetensors", {"blocks": calib})
    stats = {"calibration": {"source": d.calibration, "chars": len(calib_text), "blocks": list(calib.shape)},
             "evaluation": {}}
    for name, text in evals.items():
        # held-out text is stored as text: the evaluation tokenizes it with its own eval.ppl_seq_len, so that
        # changing an eval parameter reruns only the evaluation
        write_text(out / "eval" / f"{name}.txt", text)
        stats["evaluation"][name] = {"chars": len(text)}
    if "local" in evals:
        tasks = write_local_tasks({"heldout": evals["local"]}, out / "tasks", n_items=d.zero_shot_items, seed=d.seed)
        stats["local_tasks"] = tasks
    write_json(out / "stats.json", stats)
    return stats


def load_calibration(data_dir: str | Path) -> torch.Tensor:
    """The calibration blocks [n, seq_len] written by the data stage."""
    from pgprune.io import load_tensors

    blocks = load_tensors(Path(data_dir) / "calib.safetensors", "calibration blocks (data stage)")["blocks"]
    if blocks.dim() != 2 or blocks.dtype != torch.long:
        raise PgpruneError(f"calibration blocks in {data_dir} have shape {tuple(blocks.shape)} / {blocks.dtype}; "
                           "expected int64 [n, seq_len]; rerun the data stage")
    return blocks


def load_eval_data(data_dir: str | Path, tokenizer, params: Params) -> tuple[dict[str, torch.Tensor], Path]:
    """({eval corpus: blocks of eval.ppl_seq_len tokens (the first eval.ppl_blocks)}, tasks folder)."""
    from pgprune.data import tokenize_blocks

    data = Path(data_dir)
    order = {name: i for i, name in enumerate(params.data.evaluation)}  # data.evaluation's order, then the rest
    texts = sorted((data / "eval").glob("*.txt"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    if not texts:
        raise MissingFileError(f"no held-out evaluation text in {data / 'eval'}; run the data stage")
    evals = {p.stem: tokenize_blocks(p.read_text(encoding="utf-8"), tokenizer, params.eval.ppl_seq_len,
                                     max_blocks=params.eval.ppl_blocks, source=f"held-out text '{p}'",
                                     setting="eval.ppl_seq_len") for p in texts}
    return evals, data / "tasks"


__all__ = ["corpus_texts", "prepare_data", "load_calibration", "load_eval_data"]
