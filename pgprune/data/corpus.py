"""The embedded default's real English corpus, from Debian packages: the King James Bible (bible-kjv),
the fortune-mod collection (fortunes) and the Jargon File (jargon-text).

Each source is cut into documents; each document goes, by a stable hash of its text, to the calibration
or the held-out split, so the two never share a document. ``scripts/setup.sh`` installs the packages.

A second, out-of-domain evaluation text of another genre (legal prose the calibration never sees): the software
licences every Debian system carries in /usr/share/common-licenses (package base-files), a fixed list of files.
"""
from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from pgprune.errors import MissingFileError, PgpruneError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
SOURCES = ("kjv", "fortunes", "jargon")
_INSTALL = "apt-get install -y bible-kjv bible-kjv-text fortunes jargon-text (scripts/setup.sh does this)"


def kjv_documents(passage_verses: int = 12) -> list[str]:
    """The KJV, as passages of ``passage_verses`` consecutive verses (references stripped)."""
    exe = shutil.which("bible")
    if exe is None:
        raise MissingFileError(f"the `bible` program (Debian bible-kjv) is not installed; {_INSTALL}")
    out = subprocess.run([exe, "-f", "Gen 1:1-Rev 22:21"], capture_output=True, text=True, check=True).stdout
    verses = [re.sub(r"^\S+\s+", "", line).strip() for line in out.splitlines() if line.strip()]
    verses = [v for v in verses if v]
    return [" ".join(verses[i:i + passage_verses]) for i in range(0, len(verses), passage_verses)]


def fortune_documents(directory: Path = FORTUNES_DIR) -> list[str]:
    """Every fortune (entries separated by lines holding only '%'), skipping the ASCII-art files."""
    if not directory.is_dir():
        raise MissingFileError(f"fortunes not found at {directory}; {_INSTALL}")
    docs = []
    for f in sorted(directory.iterdir()):
        if f.suffix in (".dat", ".u8") or f.is_symlink() or not f.is_file() or "art" in f.name:
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            entry = entry.strip()
            if len(entry) > 40:
                docs.append(entry)
    return docs


def jargon_documents(path: Path = JARGON_FILE) -> list[str]:
    """Jargon File entries/paragraphs (blank-line separated), whitespace normalised."""
    if not path.exists():
        raise MissingFileError(f"Jargon File not found at {path}; {_INSTALL}")
    text = gzip.open(path, "rt", encoding="utf-8", errors="replace").read()
    paras = [re.sub(r"[ \t]+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p) > 80 and not set(p) <= set("═─-= \n")]


LICENSES_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "GPL-1", "GPL-2", "GPL-3",
                 "LGPL-2", "LGPL-2.1", "LGPL-3", "MPL-1.1", "MPL-2.0")


def license_text(directory: Path = LICENSES_DIR) -> str:
    """The out-of-domain evaluation text: the licences above, in that order, paragraphs whitespace-normalised."""
    missing = [f for f in LICENSE_FILES if not (directory / f).is_file()]
    if missing:
        raise MissingFileError(f"licence texts {missing} not found in {directory} (Debian package base-files); "
                               "use data.evaluation without 'licenses' on other systems")
    docs = []
    for f in LICENSE_FILES:
        text = (directory / f).read_text(encoding="utf-8", errors="replace")
        paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
        docs.append("\n".join(p for p in paras if p))
    return "\n\n".join(docs)


READERS = {"kjv": kjv_documents, "fortunes": fortune_documents, "jargon": jargon_documents}


def is_heldout(doc: str, fraction: float, seed: int = 0) -> bool:
    h = hashlib.sha256(f"{seed}:{doc}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < fraction


def split_documents(docs: list[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    calib, held = [], []
    for d in docs:
        (held if is_heldout(d, fraction, seed) else calib).append(d)
    return calib, held


def load_local_corpus(sources=SOURCES, heldout_fraction: float = 0.1, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """{source: {"calibration": [...], "heldout": [...]}} for the named Debian sources."""
    out = {}
    for s in sources:
        if s not in READERS:
            raise PgpruneError(f"unknown local corpus {s!r}; allowed: {list(READERS)}")
        calib, held = split_documents(READERS[s](), heldout_fraction, seed)
        out[s] = {"calibration": calib, "heldout": held}
    return out


def interleave(texts_by_source: dict[str, list[str]], seed: int = 0) -> str:
    """Join documents of several sources, shuffled together deterministically, separated by blank lines."""
    import random

    docs = [d for s in sorted(texts_by_source) for d in texts_by_source[s]]
    random.Random(seed).shuffle(docs)
    return "\n\n".join(docs)
