"""Command settings declared once: a dataclass field carries its default, its help and its bound, and the command's
flags are generated from it (as vLLM's ``FrontendArgs.add_cli_args`` and ds_spd's config sections do), the values
read back by name and checked against the bounds with an error that names the flag.

No torch or pydantic here: ``ds-spd --help`` builds every flag from settings, and every serving rank imports them.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

from ds_spd.errors import SPDInputError


def setting(default: Any, help: str, *, check: Callable[[Any, Any], bool] | None = None, bound: str = "",
            flag: str | None = None, parse: Callable[[str], Any] | None = None, metavar: str | None = None,
            env: tuple[str, ...] = (), cli: bool = True, secret: bool = False,
            choices: tuple[str, ...] | None = None, refusal: str | None = None) -> Field:
    """A settings field. ``check(value, settings)`` is its bound (``bound`` says it in words); ``flag`` replaces
    ``--field-name``; ``parse`` reads the flag's text (default: the default's type); ``env``: variables read, in
    order, for the default (a secret is better passed so than as a flag, which shows in ps); ``cli=False``: not a
    flag (a setting only code sets); ``secret``: its value is never shown in an error; ``refusal``: the whole error
    where the bound is not a range."""
    return field(default=default, metadata={"help": help, "check": check, "bound": bound, "flag": flag,
                                            "parse": parse, "metavar": metavar, "env": env, "cli": cli,
                                            "secret": secret, "choices": choices,
                                            "refusal": refusal})


def flag_of(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: Field) -> Any:
    for name in f.metadata.get("env", ()):
        if os.environ.get(name):
            return os.environ[name]
    return None if f.default is MISSING else f.default


def add_flags(group: argparse._ActionsContainer, cls: type) -> None:
    """One flag per field of the settings dataclass ``cls`` (its help says the default and the bound)."""
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        default = _default(f)
        parse = f.metadata.get("parse") or (type(f.default) if f.default not in (None, MISSING) else str)
        words = f.metadata.get("help", "")
        if parse is bool:   # a switch: off unless given
            if f.default is not False:
                raise TypeError(f"setting {f.name}: a boolean setting is a switch that defaults to False")
            group.add_argument(flag_of(f), dest=f.name, action="store_true", help=words.replace("%", "%%"))
            continue
        if f.metadata.get("bound"):
            words += f" ({f.metadata['bound']})"
        if f.default not in (None, MISSING) and not f.metadata.get("env"):
            words += f"; default {_shown(f.default)}"
        group.add_argument(flag_of(f), dest=f.name, type=parse, default=default, help=words.replace("%", "%%"),
                           metavar=f.metadata.get("metavar"), choices=f.metadata.get("choices"))


def _shown(value: Any) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def from_args(cls: type, args: argparse.Namespace, **given: Any):
    """The settings of ``cls`` from parsed flags (``given`` sets what is not a flag, or overrides one)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli", True) and hasattr(args, f.name)}
    return cls(**{**values, **given})


def check_bounds(settings: Any) -> None:
    """Every field against its bound; the first out of range is an error naming its flag, its value and the bound."""
    for f in fields(settings):
        check = f.metadata.get("check")
        value = getattr(settings, f.name)
        if check is not None and not check(value, settings):
            if f.metadata.get("refusal"):
                raise SPDInputError(f.metadata["refusal"])
            shown = "" if f.metadata.get("secret") else f" {value!r}"
            raise SPDInputError(f"{flag_of(f)}{shown} is out of range: {f.metadata.get('bound') or 'see --help'}")


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], tuple]:
    """A flag's parser for a comma-separated list, e.g. ``--fractions 0,0.5,1``."""
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"a comma-separated list of {kind.__name__} values, got {text!r}")
    parse.__name__ = f"{kind.__name__} list"
    return parse
