"""Every defense's config, in a module named after the defense, and the bases several share (shared.py).

Torch-free, so a config is validated without importing torch. Importing this package imports every module in it,
whose `@declare_method` declares its defense: a new defense is its module here, its run in
methods/defenses/<name>.py and its search space (docs/architecture.md).
"""

from __future__ import annotations

from methods.core.method import declare_package

declare_package(__name__, __path__)
