"""What a saved model folder says about itself: the pgprune model card's metadata and rows (README.md) and
masks.json, read back (the GGUF export's metadata, the recovery's teacher)."""
from __future__ import annotations

import re
from pathlib import Path

from pgprune.errors import PgpruneError


def card_metadata(folder: str | Path) -> dict:
    """What the folder's pgprune model card (``README.md``) and ``masks.json`` say: base_model, name, method,
    sparsity (requested), removed (decoder-layer linear parameters, text), compensation, version, kept (text);
    only the keys found."""
    folder = Path(folder)
    out: dict = {}
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    front = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if front:
        import yaml

        try:
            meta = yaml.safe_load(front.group(1)) or {}
        except yaml.YAMLError:
            meta = {}
        base = meta.get("base_model") if isinstance(meta, dict) else None
        if isinstance(base, list) and base:
            base = base[0]
        if isinstance(base, str) and base:
            out["base_model"] = base
    rows = dict(re.findall(r"^\| ([^|\n]+?) \| (.+?) \|$", text, re.M))
    title = re.search(r"^# (.+)$", text, re.M)
    if title and title.group(1).strip() != "Pruned model":
        out["name"] = title.group(1).strip()
    base = rows.get("Base model", "").strip("` ")
    if base and base != "(not recorded)":
        out.setdefault("base_model", base)
    method = rows.get("Method", "")
    m = re.search(r"\(`([^`]+)`\)", method)
    if m or method:
        out["method"] = m.group(1) if m else method.split(":")[0].strip()
    for key, row in (("sparsity", "Requested sparsity"), ("removed", "Sparsity of decoder-layer linear parameters")):
        pct = re.match(r"\s*([0-9.]+)%", rows.get(row, ""))
        if pct:
            out[key] = round(float(pct.group(1)) / 100, 6) if key == "sparsity" else f"{pct.group(1)}%"
    comp = rows.get("Compensation", "")
    if comp:
        out["compensation"] = "refit" if comp.startswith("refit") else "bias" if comp.startswith("yes") else \
            comp.split(":")[0].strip()
    if rows.get("pgprune version"):
        out["version"] = rows["pgprune version"].strip()
    if (folder / "masks.json").is_file():
        from pgprune.core.masks import Masks
        from pgprune.io import read_json

        try:
            masks = Masks.from_json(read_json(folder / "masks.json"), source=str(folder / "masks.json"))
        except PgpruneError:
            masks = None
        if masks is not None:
            c = masks.kept_counts()
            out["kept"] = (f"{sum(c['heads'])} of {sum(h.numel() for h in masks.heads)} KV groups, "
                           f"{sum(c['channels'])} of {sum(x.numel() for x in masks.channels)} MLP channels, "
                           f"{sum(c['layers'])} of {len(c['layers'])} layers")
    return out


__all__ = ["card_metadata"]
