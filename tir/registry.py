"""A name -> object registry, as BasicSR's ``ARCH_REGISTRY`` but with a "did you mean" error.

Degradations, tools, metrics and engines each register once and are found by name from a
recipe. (basicsr.utils.registry.Registry does the same, but importing it imports all of
basicsr, and its KeyError does not suggest the closest name.)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

LISTED = 40  # an "unknown name" message lists at most this many known names


def closest(name: str, choices) -> str | None:
    """The choice most similar to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name(kind: str, name: str, known: Iterable[str], extra: str = "") -> str:
    """The project's one message for a name that is not among ``known``; the caller raises it
    with its own exception type (prefixing where, if it wants)::

        unknown degradation 'nosie'; did you mean 'noise'? (known: noise, jpeg, ...)

    The hint is the closest of ``known``; the list keeps their order and stops after ``LISTED``
    names ("... and 12 more"); ``extra`` ends the parenthesis ("...; or a checkpoint folder")."""
    known = [str(k) for k in known]
    hint = closest(name, known)
    listed = ", ".join(known[:LISTED]) or "none"
    if len(known) > LISTED:
        listed += f", ... and {len(known) - LISTED} more"
    return (
        f"unknown {kind} {name!r}"
        + (f"; did you mean {hint!r}?" if hint else "")
        + f" (known: {listed}{'; ' + extra if extra else ''})"
    )


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: ``@REGISTRY.register()`` or ``@REGISTRY.register("name")``."""

        def add(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = obj
            return obj

        return add

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise KeyError(unknown_name(self.kind, name, sorted(self._items)))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)
