"""Typed, self-validating method configs.

Every method's config is a dataclass deriving from `Config`. Ranges live in field metadata
(`field(default=..., metadata={"range": (lo, hi)})` or `{"choices": (...)}`), so one generic validator checks
all of them and the orchestrator can turn the same metadata into error messages for search spaces.
A bad value raises ValueError naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any


def ranged(default: Any, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A numeric field whose value must lie in [lo, hi] (either bound may be open-ended with None)."""
    return dataclasses.field(default=default, metadata={"range": (lo, hi), "doc": doc})


def choice(default: Any, choices: tuple[Any, ...], doc: str = "") -> Any:
    return dataclasses.field(default=default, metadata={"choices": tuple(choices), "doc": doc})


def listed(default: list | tuple, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A list-valued field; every element must lie in [lo, hi]."""
    value = list(default)
    return dataclasses.field(default_factory=lambda: list(value), metadata={"range": (lo, hi), "doc": doc})


def _type_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    """Check (and lightly coerce) a value against a simple annotation: int, float, bool, str, Optional, list."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _union_ok(value, typing.get_args(annotation))
    if origin in (list, tuple):
        return _sequence_ok(value, (typing.get_args(annotation) or (Any,))[0])
    return _scalar_ok(value, annotation)


def _union_ok(value: Any, members: tuple[Any, ...]) -> tuple[bool, Any]:
    if value is None and type(None) in members:
        return True, None
    for member in members:
        if member is type(None):
            continue
        ok, coerced = _type_ok(value, member)
        if ok:
            return True, coerced
    return False, value


def _sequence_ok(value: Any, inner: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    out = []
    for item in value:
        ok, coerced = _type_ok(item, inner)
        if not ok:
            return False, value
        out.append(coerced)
    return True, out


def _scalar_ok(value: Any, annotation: Any) -> tuple[bool, Any]:
    if annotation is Any:
        return True, value
    if annotation is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool) and annotation in (int, float):
        return False, value
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if annotation is float:
        if isinstance(value, (int, float)):
            return True, float(value)
        return False, value
    if annotation is str:
        return isinstance(value, str), value
    return True, value


def _type_name(annotation: Any) -> str:
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X] reads "X or null" (null is YAML's None)
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if args:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", None) or str(annotation)


@dataclasses.dataclass
class Config:
    """Base of every method config. Subclasses add fields with `ranged`/`choice` metadata."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, coerced = _type_ok(value, hints.get(f.name, Any))
            if not ok:
                raise ValueError(
                    f"{f.name}: expected {_type_name(hints.get(f.name, Any))}, got {value!r} ({type(value).__name__})"
                )
            object.__setattr__(self, f.name, coerced)
            self._check_meta(f, coerced)
        self.validate()

    def _check_meta(self, f: dataclasses.Field, value: Any) -> None:
        if value is None:
            return
        if "choices" in f.metadata and value not in f.metadata["choices"]:
            allowed = ", ".join(map(str, f.metadata["choices"]))
            raise ValueError(f"{f.name}: {value!r} is not one of {allowed}")
        if "range" in f.metadata:
            lo, hi = f.metadata["range"]
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, float) and math.isnan(v):
                    raise ValueError(f"{f.name}: NaN is not allowed")
                if (lo is not None and v < lo) or (hi is not None and v > hi):
                    raise ValueError(f"{f.name}: {v!r} is outside the allowed range {describe_range(lo, hi)}")

    def validate(self) -> None:
        """Cross-field checks; override and raise ValueError naming the fields."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        known = set(cls.field_names())
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


def describe_range(lo: float | None, hi: float | None) -> str:
    if lo is None and hi is None:
        return "(any)"
    if lo is None:
        return f"<= {hi}"
    if hi is None:
        return f">= {lo}"
    return f"[{lo}, {hi}]"
