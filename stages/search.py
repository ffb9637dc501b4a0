"""Stage `search`: policy-gradient mask search at search.sparsity (checkpointed; resumes after interruption)."""
import csv
import io
import logging
import time
from pathlib import Path

import torch

from pgprune.errors import ConfigError, require_file
from pgprune.io import torch_save, write_json, write_text
from pgprune.models import load_model
from pgprune.pg_prune import run_pg_search
from pgprune.workflow import load_data, params_summary, search_compensation
from stages._common import BASE_DIR, DATA_DIR, parse, run

OUT = Path("artifacts/search")
CHECKPOINT = Path("artifacts/checkpoints/search.pt")
log = logging.getLogger("pgprune.search")


def history_csv(history: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


def search_and_save(params, model, calib, all_scores, sparsity, out: Path, checkpoint: Path):
    t0 = time.perf_counter()
    scores = all_scores[params.search.init]
    comp = search_compensation(params, all_scores)
    try:
        outcome = run_pg_search(model, calib, scores, params.search, sparsity=sparsity, checkpoint_path=checkpoint,
                                device=params.model.device, compensation=comp)
    except ConfigError as e:
        if "checkpoint" not in str(e).lower():
            raise
        log.warning("discarding a checkpoint of other settings (%s)", e)
        checkpoint.unlink()
        outcome = run_pg_search(model, calib, scores, params.search, sparsity=sparsity, checkpoint_path=checkpoint,
                                device=params.model.device, compensation=comp)
    elapsed = time.perf_counter() - t0
    from pgprune.masked_forward import MaskedModel

    layout = MaskedModel(model).layout
    torch_save({"probs": outcome.result.probs, "init_probs": outcome.init_probs}, out / "result.pt")
    write_json(out / "masks.json", outcome.masks.to_json())
    write_text(out / "history.csv", history_csv(outcome.result.history))
    # time_s: the whole search, summed over interrupted and resumed runs (this run alone: run_time_s)
    summary = {"sparsity": sparsity, "time_s": outcome.result.elapsed_s, "run_time_s": elapsed,
               "steps": outcome.result.steps_done,
               "best_step": outcome.result.best_step, "validation": outcome.result.validation,
               "bias_compensation": comp is not None,
               "final_loss_mean": outcome.result.history[-1].get("loss_mean") if outcome.result.history else None,
               "params": params_summary(layout, outcome.masks)}
    write_json(out / "summary.json", summary)
    return outcome, summary


def main(argv=None):
    params, _ = parse(__doc__, argv=argv)
    model, _ = load_model(BASE_DIR, params.model.dtype, params.model.device)
    calib, _, _ = load_data(DATA_DIR)
    scores = torch.load(require_file("artifacts/init/scores.pt", "init scores"))
    _, summary = search_and_save(params, model, calib, scores, params.search.sparsity, OUT, CHECKPOINT)
    print({k: v for k, v in summary.items() if k != "params"})


if __name__ == "__main__":
    run(main)
