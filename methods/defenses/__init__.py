"""The defenses. Importing the package registers how every defense is run: through methods/defenses/shared/canary.py,
which hands the defense a context whose backdoor carries the blind signals' settings and, when its config asks,
the canary. canary.py imports torch, so it is imported at the first dispatch: validation imports this package
(for configs/) and must stay torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from methods.core.method import DISPATCHES, MethodSpec


@DISPATCHES.register("defense")
def dispatch_with_blind_signals(run: Callable[..., Any], spec: MethodSpec) -> Callable[..., Any]:
    from methods.defenses.shared.canary import with_blind_signals

    return with_blind_signals(run, spec)
