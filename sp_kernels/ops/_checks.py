"""Argument checks the op modules share: schema types on every call, and common value checks.

The type converters take ``(op, name, value)`` and return the value as the schema wants it; their
messages name the op and the argument, as the C++ checks do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

Tensor = torch.Tensor
Converter = Callable[[str, str, Any], Any]


def tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def optional_tensor(op: str, name: str, t: object) -> Tensor | None:
    return None if t is None else tensor(op, name, t)


def integer(op: str, name: str, value: object, where: Callable[[], str] | None = None) -> int:
    # bool is an int to Python but never a length or an index here. ``where`` adds context to the
    # message, built only when there is one to give.
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
        context = f" {where()}" if where is not None else ""
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}{context}")
    return value


def int_list(op: str, name: str, values: Iterable[int]) -> list[int]:
    return [int(i) for i in values]


def flag(op: str, name: str, value: object) -> bool:
    return bool(value)


def typed(op: str, **converters: Converter) -> Callable[..., tuple[Any, ...]]:
    """An Op's ``types``: one converter per schema argument, in schema order."""
    named = tuple(converters.items())

    def types(*args: Any) -> tuple[Any, ...]:
        return tuple(convert(op, name, value) for (name, convert), value in zip(named, args))

    return types


def at_least(op: str, name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")


def same_device(op: str, name: str, t: Tensor, ref: Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
