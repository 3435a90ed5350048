"""Option validation: every keyword a user passes is checked once, up front (type, range, finiteness), and a bad
value raises an error that names the option. A validator is ``(name, value) -> value`` (the value, possibly
normalised) that raises ``TypeError`` (wrong type) or ``ValueError`` (wrong value)."""
from __future__ import annotations

import math
import numbers
from typing import Callable

Validator = Callable[[str, object], object]


def _where(name: str) -> str:
    return f"loram_fast: option {name}="


def boolean() -> Validator:
    """True or False only (a string such as "no" is refused, not taken as True)."""

    def check(name, value):
        if not isinstance(value, bool):
            raise TypeError(f"{_where(name)}{value!r}: expected True or False, got {type(value).__name__}")
        return value

    return check


def integer(minimum: int | None = None, *, optional: bool = False) -> Validator:
    def check(name, value):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{_where(name)}{value!r}: expected an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{_where(name)}{value!r}: must be >= {minimum}")
        return int(value)

    return check


def positive_real() -> Validator:
    """A finite number > 0 whose square root and inverse are finite and non-zero in fp32 (γ-like scales)."""

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{_where(name)}{value!r}: expected a number, got {type(value).__name__}")
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{_where(name)}{value!r}: must be a finite number > 0")
        if not 1e-30 < value < 1e30:
            raise ValueError(f"{_where(name)}{value!r}: out of range (1e-30, 1e30); the adapters would overflow "
                             "or vanish in fp32")
        return value

    return check


def choice(*values) -> Validator:
    def check(name, value):
        if not isinstance(value, str) or value not in values:
            raise ValueError(f"{_where(name)}{value!r}: unknown {name}; valid values are {', '.join(map(repr, values))}")
        return value

    return check


def real_in(accept: Callable[[float], bool], expected: str) -> Validator:
    """A number (not a bool) for which ``accept`` holds, returned as float; ``expected`` says what is valid."""

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not accept(value):
            raise ValueError(f"{_where(name)}{value!r}: expected {expected}")
        return float(value)

    return check


def peft_config(kind: str, *fields: str, allow_dict: bool = False) -> Validator:
    """An optional peft config object of class ``kind``: None, anything with ``fields`` (or, ``allow_dict``, a dict)."""

    def check(name, value):
        if value is None or (allow_dict and isinstance(value, dict)) or all(hasattr(value, f) for f in fields):
            return value
        raise TypeError(f"{_where(name)}{value!r}: expected peft's {kind}" + (" or its dict" if allow_dict else ""))

    return check


def int_choice(*values: int) -> Validator:
    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value not in values:
            raise ValueError(f"{_where(name)}{value!r}: valid values are {', '.join(map(repr, values))}")
        return value

    return check


def callable_() -> Validator:
    def check(name, value):
        if not callable(value):
            raise TypeError(f"{_where(name)}{value!r}: expected a callable")
        return value

    return check


def iterable() -> Validator:
    def check(name, value):
        import torch

        if isinstance(value, (torch.Tensor, str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{_where(name)}: expected an iterable of batches (a DataLoader or a list of dicts), "
                            f"got {type(value).__name__}")
        return value

    return check


def adapter_name() -> Validator:
    def check(name, value):
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError(f"{_where(name)}{value!r}: expected a non-empty adapter name (or None for the "
                             "active adapter)")
        return value

    return check


def validate(options: dict, schema: dict[str, Validator], owner: str) -> dict:
    """``options`` checked against ``schema``; an unknown key raises ``TypeError`` listing the accepted ones."""
    unknown = sorted(set(options) - set(schema))
    if unknown:
        valid = ", ".join(sorted(schema)) or "none"
        raise TypeError(f"loram_fast: {owner} got unknown option(s) {', '.join(unknown)}; accepted options: {valid}")
    return {key: schema[key](key, value) for key, value in options.items()}
