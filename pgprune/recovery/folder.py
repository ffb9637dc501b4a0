"""Model folders in and out of a recovery: what a pruned folder says about its base model, and the recovered
folder (the input folder's files, the merged weights, the card with a Recovery section, ``recovery.json``)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from pgprune.errors import MissingFileError, PgpruneError
from pgprune.io import atomic_dir

WEIGHT_FILES = re.compile(r"(^model.*\.safetensors$)|(^model\.safetensors\.index\.json$)|(^pytorch_model.*\.bin$)|"
                          r"(^pytorch_model\.bin\.index\.json$)")
RECOVERY_FILE = "recovery.json"
VOLATILE = ("time_s", "tokens_per_s", "resumed_from_step", "tokens")


def check_model_folder(folder: str | Path) -> Path:
    p = Path(folder)
    if not p.is_dir():
        raise MissingFileError(f"model folder '{p}' not found; allowed: a folder saved by `pgprune prune`")
    if not (p / "config.json").is_file():
        raise MissingFileError(f"'{p}' has no config.json; allowed: a folder saved by `pgprune prune` (or "
                               "save_pretrained)")
    return p


def base_model_of(folder: str | Path) -> str | None:
    """The base model a pgprune folder records (its model card's ``base_model`` metadata, else its "Base model"
    row; the embedded model's display name maps back to its source name); None when it records none."""
    from pgprune.hf.folder_meta import card_metadata
    from pgprune.hf.loading import EMBEDDED, embedded_name

    base = card_metadata(folder).get("base_model")
    for source in EMBEDDED:
        if base is not None and base in (source, embedded_name(source)):
            return source
    return base


def teacher_source(folder: str | Path, teacher: str | None) -> str:
    """The teacher of a kd recovery of ``folder``: ``teacher`` when given, else the base model the folder
    records: a Hub id, the embedded model or an existing folder (a card shows a local folder by its last name
    only: then a clear error asks for --teacher)."""
    if teacher:
        return teacher
    from pgprune.hf.card import hub_base_model
    from pgprune.hf.loading import EMBEDDED

    base = base_model_of(folder)
    if base is None:
        raise PgpruneError(f"'{folder}' records no base model (its README.md names none: not a folder saved by "
                           "`pgprune prune`?), and loss 'kd' needs the dense teacher; allowed: --teacher <hub id | "
                           "folder | embedded:smollm2-135m>, or --loss lm")
    if base in EMBEDDED or hub_base_model(base) or Path(base).is_dir():
        return base
    raise PgpruneError(f"'{folder}' records the base model {base!r}, which is neither a Hub id nor a folder here (a "
                       "card names a local folder by its last part only); allowed: --teacher <that folder | hub id>, "
                       "or --loss lm")


def recovery_section(info: dict, data: str) -> str:
    """The model card's Recovery section (markdown) from a recovery's ``info`` and data description."""
    s = info["settings"]
    loss = ("distillation from the dense model (KL, T=%g)" % s["temperature"] if s["loss"] == "kd"
            else "next-token cross-entropy")
    first, last = (info["losses"][0], info["losses"][-1]) if info["losses"] else (None, None)
    rows = [
        "## Recovery", "",
        "After pruning, LoRA adapters were trained and merged into the weights (`pgprune recover`).", "",
        "| | |", "|---|---|",
        f"| Loss | {loss} |",
        f"| Data | {data} |",
        f"| Steps | {s['steps']} × {s['batch_size'] * s['grad_accum']} blocks of {s['seq_len']} tokens "
        f"({info['steps'] * s['batch_size'] * s['grad_accum'] * s['seq_len']:,} tokens) |",
        f"| LoRA | rank {s['rank']}, alpha {s['alpha']:g}, dropout {s['dropout']:g} on "
        f"{', '.join(s['target_modules'])} |",
        f"| Optimiser | AdamW, lr {s['lr']:g}, {s['schedule']} schedule, warm-up over {s['warmup_ratio']:.0%} of "
        "the steps |",
    ]
    if first is not None:
        rows.append(f"| Training loss | {first:.4f} → {last:.4f} |")
    if info.get("teacher"):
        rows.append(f"| Teacher | `{info['teacher']}` |")
    if info.get("evaluation"):
        for corpus, (before, after) in info["evaluation"].items():
            rows.append(f"| Perplexity ({corpus}) | {before:.2f} → {after:.2f} |")
    return "\n".join(rows) + "\n"


def _card_with(section: str, card: str) -> str:
    """The card text with its Recovery section replaced or appended."""
    card = re.sub(r"\n## Recovery\n.*?(?=\n## |\Z)", "\n", card, flags=re.S).rstrip("\n")
    return card + "\n\n" + section


def write_recovered(model, src: str | Path | None, out_dir: str | Path, *, tokenizer=None, info: dict, data: str,
                    save_pruned=None) -> Path:
    """Write the recovered ``model`` to ``out_dir`` atomically: the files of ``src`` (a model folder: tokenizer,
    masks.json, modeling file, card) with the merged weights and config in place of its weights, or, with
    ``save_pruned`` (a callable writing the pgprune folder of ``model`` to a path: save_model), that folder;
    then the card's Recovery section and ``recovery.json`` (settings, losses, data). The layout is the input's:
    the same class, config and files."""
    with atomic_dir(out_dir) as tmp:
        if save_pruned is not None:
            staged = tmp / ".pruned"
            save_pruned(staged)
            for f in staged.iterdir():
                f.rename(tmp / f.name)
            staged.rmdir()
        else:  # the input folder's files, the merged weights and config in place of its own
            for f in sorted(Path(src).iterdir()):
                if f.is_file() and not WEIGHT_FILES.match(f.name):
                    shutil.copy2(f, tmp / f.name)
            model.save_pretrained(tmp)
        if tokenizer is not None and not (tmp / "tokenizer_config.json").exists():
            tokenizer.save_pretrained(tmp)
        card = (tmp / "README.md").read_text(encoding="utf-8") if (tmp / "README.md").exists() else ""
        (tmp / "README.md").write_text(_card_with(recovery_section(info, data), card), encoding="utf-8")
        # what a rerun reproduces (time, speed and where a resumed run started are left out: same bytes)
        record = {"data": data, **{k: v for k, v in info.items() if k not in VOLATILE}}
        (tmp / RECOVERY_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return Path(out_dir)


__all__ = ["RECOVERY_FILE", "check_model_folder", "base_model_of", "teacher_source", "recovery_section",
           "write_recovered"]
