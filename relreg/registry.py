"""The one registry type behind relreg's names: explainers, objective terms and metrics.

A :class:`Registry` maps names to entries (a function, a class, a spec) with one API and one
wording for its errors, whatever it holds:

Example:
    >>> from relreg.registry import Registry
    >>> colours = Registry("colour")
    >>> _ = colours.register("red", (255, 0, 0))
    >>> colours.get("red")
    (255, 0, 0)
    >>> colours.list()
    ['red']
    >>> colours.get("blue")
    Traceback (most recent call last):
    ...
    ValueError: Unknown colour 'blue'; expected one of: red.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind.

    Args:
        kind: what the entries are, as the error messages name them (``"explainer"``).
        check: called with ``(name, entry)`` before an entry is added; raises to refuse it.
    """

    def __init__(self, kind: str, check: Callable[[str, T], None] | None = None) -> None:
        self.kind = kind
        self._check = check
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str, entry: T, *, overwrite: bool = False) -> T: ...

    @overload
    def register(
        self, name: str, entry: None = None, *, overwrite: bool = False
    ) -> Callable[[T], T]: ...

    def register(
        self, name: str, entry: T | None = None, *, overwrite: bool = False
    ) -> T | Callable[[T], T]:
        """Add ``entry`` under ``name`` and return it; without ``entry``, a decorator that does.

        Raises:
            TypeError: ``name`` is not a non-empty string.
            ValueError: ``name`` is taken and ``overwrite`` is False.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"Expected a {self.kind} name a non-empty string, but got {name!r}.")

        def add(item: T) -> T:
            if name in self._entries and not overwrite:
                raise ValueError(
                    f"Expected a new {self.kind} name, but {name!r} is already registered; "
                    "pass overwrite=True to replace it."
                )
            if self._check is not None:
                self._check(name, item)
            self._entries[name] = item
            return item

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ValueError: for an unknown name; the message lists the known ones.
        """
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(
                f"Unknown {self.kind} {name!r}; expected one of: {', '.join(self.list())}."
            )
        return self._entries[name]

    def list(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its entry (tests register and remove their own)."""
        entry = self.get(name)
        del self._entries[name]
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.list()})"
