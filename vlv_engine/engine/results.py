"""Per-item results for batch calls that must not fail as a whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ItemResult(Generic[T]):
    """The outcome for one input: a value, or the error that stopped it."""

    index: int
    value: T | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
