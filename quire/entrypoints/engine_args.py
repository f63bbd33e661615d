"""The engine flags of every command that loads a model, generated from ``EngineArgs``.

Each dataclass field becomes ``--field-name`` with the field's type, default, help text and any
choices or aliases from its metadata (``quire.config._arg``). A field added to ``EngineArgs`` is
therefore a flag of ``quire serve`` and ``quire generate`` at once, and no default is written twice.
Only ``quire.config`` is imported, so building a parser stays cheap.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields

from quire.config import EngineArgs


def _value_type(hint: object) -> type:
    """``int`` for ``int`` and for ``int | None``: None is a default, never something typed in."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return inner
    return hint  # type: ignore[return-value]


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ``EngineArgs`` field, in a group of their own so ``--help`` sets them apart."""
    group = parser.add_argument_group("engine arguments", "the arguments LLM(...) takes, under the same names")
    hints = typing.get_type_hints(EngineArgs)
    for f in fields(EngineArgs):
        assert f.default is not MISSING, f"EngineArgs.{f.name} needs a default to be a flag"
        value_type = _value_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if f.default is not None:
            help_text += " (default: %(default)s)"
        names = [flag_name(f.name), *f.metadata.get("aliases", ())]
        if value_type is bool:
            action = group.add_argument(*names, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parse = f.metadata.get("type", value_type)  # a field may name its own parser (JSON fields)
            action = group.add_argument(*names, type=parse, default=f.default, choices=f.metadata.get("choices"))
        # Set after construction: BooleanOptionalAction appends its own "(default: ...)" on some
        # Python versions, and the help must read the same on all of them.
        action.help = help_text


def engine_kwargs(args: argparse.Namespace) -> dict[str, typing.Any]:
    """The ``EngineArgs`` keyword arguments parsed into ``args`` (every flag has the field's default)."""
    return {name: getattr(args, name) for name in EngineArgs.field_names() if hasattr(args, name)}
