"""Name -> object registries that refuse duplicates.

Everything users can name on the command line (datasets, models, attacks, defenses) lives in one of the
registries below, so tests can be parametrised over "everything registered" and a new entry needs no other edit.

DATASETS and MODELS hold torch code (loaders, model builders). They are complete the first time they are read:
the first read imports every module of their package, whose decorators register the entries. So `import methods`
stays free of torch (what validation needs), and nothing registered can be missed by a reader. Their names are
also known without torch: methods.data.configs.DATASET_INFOS and methods.models.names.MODEL_NAMES.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._package = package  # imported in full on the first read; None: entries are added by their declarers

    def _complete(self) -> dict[str, T]:
        if self._package is not None:
            package, self._package = importlib.import_module(self._package), None
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package.__name__}.{info.name}")
        return self._items

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if not name or not name.replace("_", "").isalnum() or name != name.lower():
            raise ValueError(f"{self.kind} name {name!r} must be lower-case letters, digits and underscores")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._items[name] = obj

    def get(self, name: str) -> T:
        items = self._complete()
        try:
            return items[name]
        except KeyError:
            known = ", ".join(sorted(items)) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._complete()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted(self._complete())

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._complete().items())


DATASETS: Registry[Any] = Registry("dataset", package="methods.data")
MODELS: Registry[Any] = Registry("model", package="methods.models")
# Declared without torch (methods.core.method.declare_method); each run function is attached when its module loads.
METHODS: Registry[Any] = Registry("method")
