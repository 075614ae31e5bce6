"""Typed, strict configs: a dict (a study TOML's table, a run's config.json) becomes a dataclass, or a
one-line KbenchError names the key or value that doesn't fit. An unknown key is never dropped
(nanoGPT's configurator, flax's locked ConfigDict).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing

from kbench.core.errors import KbenchError


def field_names(cls) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)]


def default(cls, name: str, missing=dataclasses.MISSING):
    """The default of a dataclass field: CLI help and defaults are read from here, not retyped.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     epochs: int = 10
    >>> default(Example, "epochs")
    10
    """
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    if missing is not dataclasses.MISSING:
        return missing
    raise KeyError(f"{cls.__name__}.{name} has no default")


def check_keys(values: dict, allowed, where: str) -> None:
    """KbenchError naming the first key of ``values`` not in ``allowed`` (with a close match)."""
    allowed = list(allowed)
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(allowed))}"
            raise KbenchError(f"{where}: unknown key {key!r}{hint}")


def check_value(value, annotation, key: str, where: str):
    """``value`` if it fits the type ``annotation`` (ints pass as floats), else KbenchError."""
    if _fits(value, annotation):
        return float(value) if annotation is float and isinstance(value, int) else value
    expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    raise KbenchError(f"{where}: {key} = {value!r} is not a valid {expected}")


def _fits(value, annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is typing.Any:
        return True
    if origin is list:
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is str:
        return isinstance(value, str)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def from_dict(cls, values: dict, where: str, **given):
    """``cls(**given, **values)`` after checking every key and value of ``values`` against ``cls``."""
    hints = typing.get_type_hints(cls)
    check_keys(values, [name for name in field_names(cls) if name not in given], where)
    checked = {key: check_value(value, hints[key], key, where) for key, value in values.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in checked
        and f.name not in given
    ]
    if missing:
        raise KbenchError(f"{where}: missing {', '.join(missing)}")
    return cls(**given, **checked)


MAX_EPOCHS = 10_000  # more is a typo: 10,000 epochs of even 40 tiny images is hours of training


def positive(value, option: str, whole: bool = False, most: int | None = None):
    """KbenchError unless ``value`` is a finite number > 0 (NaN and inf included) and, given
    ``most``, no more than it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise KbenchError(f"{option} must be a positive {'whole number' if whole else 'number'}; got {value!r}")
    if whole and not isinstance(value, int):
        raise KbenchError(f"{option} must be a whole number; got {value}")
    if most is not None and value > most:
        raise KbenchError(f"{option} {value} is more than the limit of {most:,}")
    return value


def option(default=dataclasses.MISSING, help: str = "", **click_options):
    """A dataclass field that is also a command-line option: its help text lives beside its default,
    and ``kbench.cli.main`` builds the option from both (``click_options`` such as ``choices``,
    ``shown_default`` reach click)."""
    metadata = {"help": help, **click_options}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def options_of(cls) -> dict[str, dict]:
    """{field name: its option metadata (help, choices, ...)} for the fields declared with ``option``."""
    return {f.name: dict(f.metadata) for f in dataclasses.fields(cls) if "help" in f.metadata}
