"""bdo's methods: datasets, models, attacks, defenses and metrics in pure PyTorch (no ray, no mlflow).

Importing `methods` registers everything without importing torch: every attack and defense is declared with its
config in its own module of its kind's torch-free `configs` package, imported here. The torch side is imported when
first used: a method's run function when `METHODS.get(name).run` is read, and the dataset and model registries,
which import every module of methods/data and methods/models the first time they are read. A new method is its
config module in the kind's configs/ plus one file with its run (and its search space); nothing else needs editing.
"""

from __future__ import annotations

import methods.attacks.configs  # noqa: F401  (declares every attack)
import methods.defenses.configs  # noqa: F401  (declares every defense)
from methods.core.registry import DATASETS, METHODS, MODELS

__all__ = ["DATASETS", "METHODS", "MODELS"]
