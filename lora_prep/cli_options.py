"""CLI options generated from the settings models: one definition serves the CLI, the flow parameters and the UI form.

Each field of each settings model becomes ``--kebab-name`` with the field's description as its
help, the model's default shown, ``Literal`` values as choices, booleans as ``--x/--no-x``,
lists as comma-separated values, dicts as ``key=value,...`` or JSON. ``ALIASES`` keeps the
spellings the README has always shown where the generated name differs. Values are validated
by the models themselves, every problem reported in one line.

Why not a CLI library (pydantic-settings' CliApp, typer, cyclopts): none of them flattens five
nested models into one option namespace while keeping argparse's exit-2 behaviour and our
existing spellings; this is the ~150 lines that do exactly that over ``model_fields``.
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from lora_prep.tasks.settings import (
    PRESETS,
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
    TrackingSettings,
)

SECTIONS: dict[str, type[BaseModel]] = {
    "source": SourceSettings,
    "load": LoadSettings,
    "lora": LoraSettings,
    "tracking": TrackingSettings,
    "output": OutputSettings,
}
# Generated name -> extra spellings users' scripts already use.
ALIASES = {"attn_implementation": ("--attn",)}
_SEP = "__"  # dest = <section>__<field>


class UsageError(Exception):
    """Bad command-line syntax (a bad value is reported by the settings models)."""


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _members(annotation) -> list:
    """The leaf types of an annotation: Annotated unwrapped, unions flattened, None dropped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [] if annotation is type(None) else [annotation]


def _choices(members: list) -> list[str] | None:
    literals = [m for m in members if typing.get_origin(m) is typing.Literal]
    if len(literals) == len(members) == 1:
        return [str(v) for v in typing.get_args(literals[0])]
    return None


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _mapping(text: str, value_type=str) -> dict:
    """'cpu=20GiB,0=70GiB' or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{text!r} is not valid JSON ({exc.msg})") from None
    out = {}
    for part in _csv(text):
        key, sep, value = part.partition("=")
        if not sep:
            raise UsageError(f"{part!r} is not KEY=VALUE; use e.g. cpu=20GiB,0=70GiB or a JSON object")
        out[key.strip()] = value_type(value.strip()) if value_type is not str else value.strip()
    return out


def _converter(members: list):
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


def _help(field) -> str:
    default = field.get_default(call_default_factory=True)
    shown = "none" if default is None else json.dumps(default) if not isinstance(default, str) else default
    return f"{field.description} (default: {shown})".replace("%", "%%")


def add_settings_options(parser: argparse.ArgumentParser) -> None:
    """Every field of every settings model, grouped by model."""
    for section, model in SECTIONS.items():
        group = parser.add_argument_group(section, (model.__doc__ or "").strip().splitlines()[0])
        for name, field in model.model_fields.items():
            members = _members(field.annotation)
            flags = [option(name), *ALIASES.get(name, ())]
            dest = f"{section}{_SEP}{name}"
            if members == [bool]:
                group.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=_help(field))
                continue
            choices = _choices(members)
            metavar = "|".join(choices) if choices else name.upper()
            group.add_argument(*flags, dest=dest, default=None, type=_converter(members), choices=choices, metavar=metavar, help=_help(field))


def covered_fields(parser: argparse.ArgumentParser) -> set[tuple[str, str]]:
    """(section, field) pairs that have an option: for the test that every field has one."""
    return {tuple(a.dest.split(_SEP, 1)) for a in parser._actions if _SEP in (a.dest or "")}


def settings_from_args(args: argparse.Namespace) -> dict[str, BaseModel]:
    """All settings models from the parsed options, validated together: every bad field in one line."""
    from lora_prep.tasks.errors import InvalidInput

    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for dest, value in vars(args).items():
        if _SEP in dest and value is not None:
            section, name = dest.split(_SEP, 1)
            values[section][name] = value
    settings, problems = {}, []
    for section, model in SECTIONS.items():
        try:
            settings[section] = model(**values[section])
        except ValidationError as exc:
            problems += [field_problem(section, err) for err in exc.errors()]
    if problems:
        raise InvalidInput("invalid settings: " + "; ".join(problems))
    return settings


def field_problem(section: str, err: dict) -> str:
    """'lora.r: Input should be greater than 0 (got -1); use --r'."""
    parts = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")) and p not in ("str", "list[str]", "bool", "int", "float")]
    field = parts[0] if parts else ""
    where = f"{section}.{'.'.join(parts)}" if parts else section
    message = err["msg"].removeprefix("Value error, ").rstrip(".")
    value = err.get("input")
    shown = "" if isinstance(value, dict) or repr(value) in message else f" (got {value!r})"
    hint = f"; set {option(field)}" if field else ""
    return f"{where}: {message}{shown}{hint}"
