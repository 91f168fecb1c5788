"""bdo's methods: datasets, models, attacks, defenses and metrics in pure PyTorch (no ray, no mlflow).

Importing `methods` registers everything: every module under data/, models/, attacks/ and defenses/ is imported
so its registry decorators run. A new method is one new file; nothing else needs editing.
"""
from __future__ import annotations

import importlib
import pkgutil

from methods.core.registry import DATASETS, METHODS, MODELS

_PACKAGES = ("methods.data", "methods.models", "methods.attacks", "methods.defenses")


def _import_all() -> None:
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


_import_all()

__all__ = ["DATASETS", "METHODS", "MODELS"]
