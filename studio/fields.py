"""Typed settings: dataclass fields that carry their help text (and a form label), checked by type.

Every settings dataclass of the studio (the training config's sections, each adapter's own settings,
the evaluation's) declares its fields with `setting(...)`, so the CLI's help, the UI's form controls and
the error sentences come from one place: the field's type (a Literal is a choice), its default and help.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal

import yaml

from studio import limits
from studio.errors import StudioError


def setting(help: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, label: str = "",
            bounds: tuple[float, float] | None = None, above: float | None = None):
    """A dataclass field with its help text, the label a form shows (if it differs from the name), and for
    numbers the range `check` holds it to: `bounds` (lowest, highest), `above` a value it must exceed."""
    metadata = {"help": help, "label": label, "bounds": bounds, "above": above}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def help_of(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def label_of(cls, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("label") or name.replace("_", " ").capitalize()
    raise KeyError(name)


def defaults_of(cls) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def types_of(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def kind(tp: Any) -> tuple[type, tuple]:
    """(int | float | bool | str | list, the allowed values of a Literal): what a form control needs."""
    if typing.get_origin(tp) is Literal:
        return str, typing.get_args(tp)
    return (typing.get_origin(tp) or tp), ()


def type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(type_ok(v, inner) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, t) for t in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def check_types(obj, what: str = "Setting") -> None:
    """Each field of the dataclass instance `obj` holds a value of its type (numbers written as text, as
    PyYAML reads `1e-4`, and ints for floats are converted in place); else one sentence naming it."""
    for name, tp in types_of(type(obj)).items():
        value = getattr(obj, name)
        if tp in (int, float) and isinstance(value, str):
            try:
                value = tp(value)
                setattr(obj, name, value)
            except ValueError:
                pass
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, name, float(value))
        elif not type_ok(value, tp):
            raise StudioError(f"{what} '{name}' must be {describe(tp)}, got {value!r}.")


def coerce(tp: Any, name: str, text: str, what: str = "Setting") -> Any:
    """The text of `name=text` (a CLI flag, `--set`) as a value of type `tp`, or one sentence why not."""
    try:
        if tp is bool:
            if text.lower() in ("true", "yes", "1", "on"):
                return True
            if text.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if typing.get_origin(tp) in (list, tuple):
            (inner, *_) = typing.get_args(tp) or (str,)
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:  # "{token} on a beach" is not YAML (braces): read it as a comma list
                if text.lstrip().startswith("["):
                    raise ValueError(text) from None
                value = None
            items = value if isinstance(value, list) else [s.strip() for s in text.split(",") if s.strip()]
            if inner in (int, float):
                items = [inner(v) for v in items]
            return items
    except (ValueError, TypeError):
        raise StudioError(f"{what} '{name}' must be {describe(tp)}, got {text!r}.") from None
    return text


def check(obj, what: str = "Setting") -> None:
    """Types (check_types), then each number inside its field's bounds: one sentence naming the first
    that is not."""
    check_types(obj, what)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("bounds") is not None:
            low, high = f.metadata["bounds"]
            limits.check_range(f.name, value, low, high, label=f"{what} '{f.name}'")
        if f.metadata.get("above") is not None and value <= f.metadata["above"]:
            raise StudioError(f"{what} '{f.name}' must be greater than {f.metadata['above']:g}, got {value!r}.")
