"""One registry type for every "name -> factory" plug-in point (models, strategies, ...).

Registering a name twice is an error; looking up an unknown name raises a
:class:`~fedslim.errors.RegistryError` that lists the known ones. No Flower import here, so
``fedslim.config`` can validate names when a config is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from fedslim.errors import RegistryError

F = TypeVar("F", bound=Callable[..., object])


class Registry(Mapping[str, F], Generic[F]):
    """Factories by name; ``what`` names the kind in error messages (e.g. ``"model"``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator adding a factory under ``name``; a duplicate name is an error."""

        def deco(fn: F) -> F:
            if name in self._items:
                raise RegistryError(f"{self.what} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def __getitem__(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(f"unknown {self.what} {name!r}; known {self.what}s: "
                                f"{sorted(self._items)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
