"""Small private helpers shared by the model modules."""

from __future__ import annotations

from collections.abc import Sequence


def to_2tuple(value: int | Sequence[int]) -> tuple[int, int]:
    """``16 -> (16, 16)``; ``(224, 160) -> (224, 160)``."""
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"Expected an int or a pair (height, width), got {value!r}.")
    return value  # type: ignore[return-value]
