"""Methods: declared without torch, run with it.

A method is declared on its config class, in its own module of its kind's torch-free configs package
(methods/attacks/configs/<name>.py, methods/defenses/configs/<name>.py): `@declare_method(name, kind)` records its
name, kind, config class and whether it splits samples, so validation knows every method and its config without
importing torch. Its `run(ctx, cfg)` lives in methods/<kind>s/<name>.py under `@register_method(name)`; that module
is imported the first time the run (or the docstring that `bdo list` summarises) is asked for.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from methods.core.config import Config
from methods.core.registry import METHODS, Registry

RUNS: Registry[Callable[..., Any]] = Registry("method run")
# How a kind's runs are called, by kind; a kind without one is called as it is. The kind's package registers it
# when imported (methods/defenses/__init__.py: every defense gets its blind signals' settings and the canary), so
# core dispatches to code above it without importing it. `import methods` imports both kinds' packages, so the
# dispatch is in place before any spec exists.
DISPATCHES: Registry[Callable[[Callable[..., Any], MethodSpec], Callable[..., Any]]] = Registry("method dispatch")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: Literal["attack", "defense"]
    config_cls: type[Config]
    # Methods that split or score training samples hand over a "scores" table and report split metrics.
    splits_samples: bool = False
    # Defenses only: whether the returned model is trained from scratch on the suspect training set (True) or
    # repairs the suspect model (False); a function of the config where a setting decides. It says where a canary
    # is planted (methods/defenses/shared/canary.py): into the training set, or into the suspect model.
    from_scratch: bool | Callable[[Config], bool] = False

    @property
    def module(self) -> str:
        """The module that holds the run function (the method's own file in its kind's package)."""
        return f"methods.{self.kind}s.{self.name}"

    @property
    def run(self) -> Callable[..., Any]:
        if self.name not in RUNS:
            importlib.import_module(self.module)
        run = RUNS.get(self.name)
        return DISPATCHES.get(self.kind)(run, self) if self.kind in DISPATCHES else run

    def trains_from_scratch(self, cfg: Config) -> bool:
        return bool(self.from_scratch(cfg) if callable(self.from_scratch) else self.from_scratch)

    @property
    def doc(self) -> str:
        """The run module's docstring (what `bdo list` summarises), read from its source: listing needs no torch."""
        source = Path(importlib.util.find_spec(self.module).origin).read_text()
        return ast.get_docstring(ast.parse(source)) or ""

    def make_config(self, values: dict[str, Any] | None = None) -> Config:
        return self.config_cls.from_dict(values or {})


def declare_method(
    name: str,
    kind: Literal["attack", "defense"],
    splits_samples: bool = False,
    from_scratch: bool | Callable[[Config], bool] = False,
) -> Callable[[type[Config]], type[Config]]:
    def decorator(config: type[Config]) -> type[Config]:
        METHODS.add(name, MethodSpec(name, kind, config, splits_samples, from_scratch))
        return config

    return decorator


def declare_package(package: str, path: list[str]) -> None:
    """Import every module of a kind's configs package (`package`, its `__path__`), in name order, so that each
    module's `@declare_method` declares its method: a new method's config module needs no list to be added to."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")


def register_method(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Attach `run` to the method declared as `name`; the run must live in that method's own module."""

    def decorator(run: Callable[..., Any]) -> Callable[..., Any]:
        spec = METHODS.get(name)
        if run.__module__ != spec.module:
            raise ValueError(f"method {name!r}: its run belongs in {spec.module}, not {run.__module__}")
        RUNS.add(name, run)
        return run

    return decorator


def get_method(name: str) -> MethodSpec:
    return METHODS.get(name)


def method_names(kind: str | None = None) -> list[str]:
    return [n for n, spec in METHODS.items() if kind is None or spec.kind == kind]
