"""Command lines derived from settings dataclasses: a field, its help and its default are written once.

    @dataclass
    class Settings:
        epochs: int = setting(200, "epochs at most")
        time_budget_s: float | None = setting(None, "seconds of training", flag="--time-budget")
        check_resources: bool = setting(True, "do not require the resources", flag="--skip-resource-check")

    p = argparse.ArgumentParser(); add_settings(p, Settings)
    s = settings_from(Settings, p.parse_args())

The flag is `--field-name` unless `flag=` names another (old names keep working); a bool whose
default is True gets a flag that turns it off, an optional bool both `--x` and `--no-x`; `Path`, `int`, `float` and `str` fields (optional
or not) are typed by their annotation, a `list[...]` field is a repeatable option; `choices=` and `metavar=` pass through. A field without
`setting(...)` metadata is not on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

CLI = "cli"


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: typing.Sequence | None = None,
    metavar: str | None = None,
    factory=None,
) -> Any:
    """A dataclass field that is also a command-line option."""
    meta = {CLI: {"help": help, "flag": flag, "choices": choices, "metavar": metavar}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(hint) -> type:
    """`int | None` -> int; a plain type as it is."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint


def add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per `setting(...)` field of `cls`, in field order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata.get(CLI)
        if meta is None:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw: dict[str, Any] = {"dest": f.name, "help": meta["help"] or None}
        if kind is bool and default is None:  # on, off or unset: --x / --no-x
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        elif kind is bool:
            kw["action"] = "store_false" if default else "store_true"
        elif typing.get_origin(kind) is list:  # a repeatable option
            item = typing.get_args(kind)[0]
            kw.update(action="append", type=item if item in (int, float, Path) else str, default=default)
            if meta["metavar"] is not None or meta["flag"]:
                kw["metavar"] = meta["metavar"] or flag.lstrip("-").replace("-", "_").upper()
        else:
            kw.update(type=kind if kind in (int, float, Path) else str, default=default)
            if meta["choices"] is not None:
                kw["choices"] = list(meta["choices"])
            if meta["metavar"] is not None or meta["flag"]:
                kw["metavar"] = meta["metavar"] or flag.lstrip("-").replace("-", "_").upper()
        parser.add_argument(flag, **kw)


def settings_from(cls: type, ns: argparse.Namespace, **given):
    """`cls` from the parsed options of its `setting(...)` fields, and `given` values for the others."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if CLI in f.metadata}
    return cls(**{**values, **given})
