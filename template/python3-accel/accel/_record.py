"""A tiny stand-in for dataclasses (whose import pulls ``inspect``, ~12 ms of cold start)."""
from __future__ import annotations


class Record:
    """Value object: subclasses list their fields in ``__slots__``; repr and == come from them."""

    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]
