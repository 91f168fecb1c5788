"""Every attack's config, in a module named after the attack, and the base they share (shared.py).

Torch-free, so a config is validated without importing torch. Importing this package imports every module in it,
whose `@declare_method` declares its attack: a new attack is its module here, its run in
methods/attacks/<name>.py and its search space (docs/architecture.md).
"""

from __future__ import annotations

from methods.core.method import declare_package

declare_package(__name__, __path__)
