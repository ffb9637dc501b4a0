"""Shared argument parsing and error handling for the thin stage scripts. Artifact paths are declared once, in
dvc.yaml's `vars: paths`, and reach every stage as command-line arguments."""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pgprune.config import Params, load_params  # noqa: E402
from pgprune.errors import PgpruneError  # noqa: E402


def parse(description: str, extra=None, argv=None) -> tuple[Params, argparse.Namespace]:
    """Parse the stage's arguments (``extra(parser)`` adds its own) and params.yaml; set up logging and torch."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    if extra:
        extra(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = load_params(args.params)
    if params.model.threads:
        import torch

        torch.set_num_threads(params.model.threads)
    return params, args


def run(main) -> None:
    """Run a stage's main; bad input exits with the message alone (no traceback), status 2."""
    try:
        main()
    except PgpruneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
