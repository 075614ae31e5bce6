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


def option(default=dataclasses.MISSING, help: str = "", *, minimum=None, below=None, **click_options):
    """A dataclass field that is also a command-line option: its help text lives beside its default,
    and ``kbench.cli.main`` builds the option from both (``click_options`` such as ``choices``,
    ``shown_default`` reach click). ``minimum`` (and ``below``) declare a whole number in
    ``minimum <= value < below``, which ``check_bounds`` checks."""
    metadata = {"help": help, **click_options}
    if minimum is not None:
        metadata.update(minimum=minimum, below=below)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_bounds(config, *names: str) -> None:
    """KbenchError in one line for the first of ``names`` (every bounded field when none is named)
    that isn't a whole number within the bounds its ``option(minimum=..., below=...)`` declares.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     warmup_epochs: int = option(0, "Warm-up epochs.", minimum=0)
    >>> check_bounds(Example(warmup_epochs=-1))
    Traceback (most recent call last):
    ...
    kbench.core.errors.KbenchError: --warmup-epochs must be a whole number >= 0; got -1
    """
    for field in dataclasses.fields(config):
        if "minimum" not in field.metadata or (names and field.name not in names):
            continue
        value, low, high = getattr(config, field.name), field.metadata["minimum"], field.metadata["below"]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
            flag = "--" + field.metadata.get("flag", field.name).replace("_", "-")
            bound = f">= {low}" if high is None else f">= {low} and < {_power_text(high)}"
            raise KbenchError(f"{flag} must be a whole number {bound}; got {value}")


def _power_text(number: int) -> str:
    """2**32 rather than 4294967296."""
    exponent = number.bit_length() - 1
    return f"2**{exponent}" if number > 1024 and number == 1 << exponent else str(number)


def options_of(cls) -> dict[str, dict]:
    """{field name: its option metadata (help, choices, ...)} for the fields declared with ``option``."""
    return {f.name: dict(f.metadata) for f in dataclasses.fields(cls) if "help" in f.metadata}
