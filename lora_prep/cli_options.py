"""CLI arguments generated from the settings models: one definition serves the CLI, the flow parameters and the UI form.

A command is a list of ``Section``s: a settings model, the fields it takes (all by default) and which
of them are positional. Each field becomes ``--kebab-name`` (or a positional) with the field's
description as its help, the model's default shown, ``Literal`` values as choices, booleans as
``--x/--no-x``, lists as comma-separated values, dicts as ``key=value,...`` or JSON. ``ALIASES`` keeps
the spellings the README has always shown where the generated name differs. Values are validated by
the models themselves, every problem reported in one line.

Why not a CLI library (pydantic-settings' CliApp, typer, cyclopts): none of them flattens several
nested models into one option namespace while keeping argparse's exit-2 behaviour and our existing
spellings; this is the ~150 lines that do exactly that over ``model_fields``.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from lora_prep.tasks.settings import PRESETS

# Generated name -> extra spellings users' scripts already use.
ALIASES = {"attn_implementation": ("--attn",)}
_SEP = "__"  # dest = <section>__<field>


class UsageError(Exception):
    """Bad command-line syntax (a bad value is reported by the settings models)."""


@dataclass(frozen=True)
class Section:
    """One settings model's part of a command: its fields (None: all of them), and which are positional."""

    name: str
    model: type[BaseModel]
    fields: tuple[str, ...] | None = None
    positional: tuple[str, ...] = ()

    def items(self) -> list[tuple[str, FieldInfo]]:
        names = self.fields if self.fields is not None else tuple(self.model.model_fields)
        return [(name, self.model.model_fields[name]) for name in names]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _members(annotation: Any) -> list[Any]:
    """The leaf types of an annotation: Annotated unwrapped, unions flattened, None dropped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _choices(members: list[Any]) -> list[str] | None:
    literals = [m for m in members if typing.get_origin(m) is typing.Literal]
    if len(literals) == len(members) == 1:
        return [str(v) for v in typing.get_args(literals[0])]
    return None


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _mapping(text: str, value_type: type = str) -> dict[str, Any]:
    """'cpu=20GiB,0=70GiB' or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{text!r} is not valid JSON ({exc.msg})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"{text!r} is not a JSON object")
        return loaded
    out: dict[str, Any] = {}
    for part in _csv(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"{part!r} is not KEY=VALUE; use e.g. cpu=20GiB,0=70GiB or a JSON object")
        out[key.strip()] = value_type(value.strip()) if value_type is not str else value.strip()
    return out


def _converter(members: list[Any]) -> Callable[[str], Any]:
    """How one option's text becomes the field's value (the model validates it afterwards)."""
    kinds = {typing.get_origin(m) or m for m in members}
    if kinds == {bool, str}:  # init_lora_weights: true | false | a method name
        return lambda text: {"true": True, "false": False}.get(text.lower(), text)
    if dict in kinds and str in kinds:  # device_map: a device, or a JSON module map
        return lambda text: _mapping(text) if text.lstrip().startswith("{") else text
    if kinds >= {list, str}:  # target_modules: a preset, a comma-separated list, or a regex
        return lambda text: text if text in PRESETS else (_csv(text) if "," in text else text)
    if dict in kinds:
        value_type = next((typing.get_args(m)[1] for m in members if typing.get_origin(m) is dict), str)
        value_type = value_type if value_type in (int, float) else str
        return lambda text: _mapping(text, value_type)
    if list in kinds:
        return _csv
    for simple in (int, float):
        if kinds == {simple}:
            return simple
    return str


def _help(field: FieldInfo) -> str:
    if field.is_required():
        return (field.description or "").replace("%", "%%")
    default = field.get_default(call_default_factory=True)
    shown = "none" if default is None else json.dumps(default) if not isinstance(default, str) else default
    return f"{field.description} (default: {shown})".replace("%", "%%")


def add_arguments(parser: argparse.ArgumentParser, sections: list[Section]) -> None:
    """Every field of every section: positionals first, then one option group per section."""
    for section in sections:
        for name, field in section.items():
            if name in section.positional:
                members = _members(field.annotation)
                parser.add_argument(
                    f"{section.name}{_SEP}{name}", metavar=name, choices=_choices(members), type=_converter(members), help=_help(field)
                )
    for section in sections:
        options = [(n, f) for n, f in section.items() if n not in section.positional]
        if not options:
            continue
        group = parser.add_argument_group(section.name, (section.model.__doc__ or "").strip().splitlines()[0])
        for name, field in options:
            members = _members(field.annotation)
            flags = [option(name), *ALIASES.get(name, ())]
            dest = f"{section.name}{_SEP}{name}"
            if members == [bool]:
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=_help(field))
                continue
            choices = _choices(members)
            metavar = "|".join(choices) if choices else name.upper()
            group.add_argument(
                *flags, dest=dest, default=None, type=_converter(members), choices=choices, metavar=metavar, help=_help(field)
            )


def covered_fields(parser: argparse.ArgumentParser) -> set[tuple[str, str]]:
    """(section, field) pairs that have an argument: for the test that every field has one."""
    return {(a.dest.split(_SEP, 1)[0], a.dest.split(_SEP, 1)[1]) for a in parser._actions if _SEP in (a.dest or "")}


def settings_from_args(args: argparse.Namespace, sections: list[Section]) -> dict[str, Any]:
    """Every section's model from the parsed arguments, validated together: every bad field in one line."""
    from lora_prep.tasks.errors import InvalidInput

    values: dict[str, dict[str, Any]] = {section.name: {} for section in sections}
    for dest, value in vars(args).items():
        if _SEP in dest and value is not None:
            section_name, name = dest.split(_SEP, 1)
            values[section_name][name] = value
    settings, problems = {}, []
    for section in sections:
        try:
            settings[section.name] = section.model(**values[section.name])
        except ValidationError as exc:
            problems += [field_problem(section.name, dict(err)) for err in exc.errors()]
    if problems:
        raise InvalidInput("invalid settings: " + "; ".join(problems))
    return settings


def field_problem(section: str, err: dict[str, Any]) -> str:
    """'lora.r: Input should be greater than 0 (got -1); set --r'."""
    parts = [
        str(p)
        for p in err["loc"]
        if not str(p).startswith(("function-", "literal[")) and p not in ("str", "list[str]", "bool", "int", "float")
    ]
    field = parts[0] if parts else ""
    where = f"{section}.{'.'.join(parts)}" if parts else section
    message = err["msg"].removeprefix("Value error, ").rstrip(".")
    value = err.get("input")
    shown = "" if isinstance(value, dict) or repr(value) in message else f" (got {value!r})"
    hint = f"; set {option(field)}" if field else ""
    return f"{where}: {message}{shown}{hint}"
