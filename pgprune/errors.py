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


def validation_messages(err, *, show_input: bool = False) -> list[str]:
    """One "loc: msg" per error of a pydantic ValidationError (loc "(root)" for a whole-model check); with
    ``show_input``, " (got value)" after each whose input is not a mapping. The one formatter of validation errors."""
    out = []
    for e in err.errors():
        line = f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}"
        if show_input and "input" in e and not isinstance(e["input"], dict):
            line += f" (got {e['input']!r})"
        out.append(line)
    return out


def format_validation(err, *, show_input: bool = False) -> str:
    """A pydantic ValidationError as one line: "loc: msg; loc: msg" (:func:`validation_messages`)."""
    return "; ".join(validation_messages(err, show_input=show_input))
