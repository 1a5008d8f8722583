"""User-input errors: each names the problem, and is raised before ranks load weights or communicate."""


class SPDInputError(ValueError):
    """Base of every error caused by what the user asked for (the CLI prints these without a traceback)."""


class ConfigError(SPDInputError):
    """A config file, section or value that ds_spd cannot use; the message names the key."""


class LayoutError(SPDInputError):
    """The model cannot be split the way the user asked (architecture, tp size)."""


class PlanError(SPDInputError):
    """A plan (or SPD block list) that is malformed or made for another model or tp size."""


class LaunchError(SPDInputError):
    """The ranks started do not fit the run (tp size vs world size, virtual TP under a launcher)."""


class OutputError(SPDInputError):
    """An output path ds_spd cannot or must not write (unwritable, or holding something ds_spd did not write)."""


class DataError(SPDInputError):
    """Text, dataset or model files that cannot be read as asked (missing, empty, not UTF-8, offline hub)."""


def describe_validation(err, what: str = "config key", prefix: str = "") -> str:
    """A pydantic ValidationError as one line naming each key: ``config key 'spd.tp_size': ...; ...``."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{what} '{key}': {msg}")
    return "; ".join(parts)


def brief(err: BaseException) -> str:
    """An exception as one line for a warning: its type and its message's first line."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
