"""Argument checks shared by every layer of relreg (the bottom of the import graph).

Each raises a ``ValueError`` / ``TypeError`` that names the argument, the expected and the
received value, in torchmetrics' ``"Expected ... but got ..."`` form.
"""

from __future__ import annotations

import math
from collections.abc import Collection

__all__ = ["check_bool", "check_choice", "check_positive_float", "check_positive_int"]


def check_positive_int(name: str, value: object, *, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (not a ``bool``), or None if allowed.

    Example:
        >>> check_positive_int("steps", 4)
        >>> check_positive_int("steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: Expected steps an int >= 1, but got 0.
    """
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        suffix = " or None" if allow_none else ""
        raise ValueError(f"Expected {name} an int >= 1{suffix}, but got {value!r}.")


def check_positive_float(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real number > 0 (not a ``bool``).

    Example:
        >>> check_positive_float("eps", 1e-5)
        >>> check_positive_float("eps", 0)
        Traceback (most recent call last):
        ...
        ValueError: Expected eps a finite number > 0, but got 0.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Expected {name} a finite number > 0, but got {value!r}.")


def check_bool(name: str, value: object) -> None:
    """Raise ``TypeError`` unless ``value`` is a ``bool``.

    Example:
        >>> check_bool("defer_gradients", 1)
        Traceback (most recent call last):
        ...
        TypeError: Expected defer_gradients a bool, but got 1.
    """
    if not isinstance(value, bool):
        raise TypeError(f"Expected {name} a bool, but got {value!r}.")


def check_choice(name: str, value: object, choices: Collection[object]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Example:
        >>> check_choice("mode", "positive", ("positive", "negative"))
    """
    if value not in tuple(choices):
        raise ValueError(f"Expected {name} one of {choices}, but got {value!r}.")
