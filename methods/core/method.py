"""Method registration: one decorator turns a `run(ctx, cfg)` function into a registered attack or defense."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from methods.core.config import Config
from methods.core.registry import METHODS


@dataclass(frozen=True)
class MethodSpec:
    name: str
    kind: Literal["attack", "defense"]
    config_cls: type[Config]
    run: Callable[..., Any]
    # Methods that split or score training samples hand over a "scores" table and report split metrics.
    splits_samples: bool = False
    summary: str = ""

    def make_config(self, values: dict[str, Any] | None = None) -> Config:
        return self.config_cls.from_dict(values or {})


def register_method(
    name: str, kind: Literal["attack", "defense"], config: type[Config], splits_samples: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(run: Callable[..., Any]) -> Callable[..., Any]:
        module = __import__(run.__module__, fromlist=["__doc__"])
        summary = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
        METHODS.add(name, MethodSpec(name, kind, config, run, splits_samples, summary))
        return run

    return decorator


def get_method(name: str) -> MethodSpec:
    return METHODS.get(name)


def method_names(kind: str | None = None) -> list[str]:
    return [n for n, spec in METHODS.items() if kind is None or spec.kind == kind]
