"""Exceptions with messages that name the offending value and what is allowed."""


class PgpruneError(Exception):
    """Base class for every error pgprune raises on bad input."""


class UnsupportedArchitectureError(PgpruneError):
    pass


class ConfigError(PgpruneError):
    pass


class BudgetError(PgpruneError):
    pass


class NaNLossError(PgpruneError):
    pass


class MissingFileError(PgpruneError, FileNotFoundError):
    pass


def require_file(path, what: str):
    """Raise MissingFileError naming the path and what it should have held."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} not found at '{p}'. Run the stage that produces it first (dvc repro).")
    return p
