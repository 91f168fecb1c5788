"""The torch-free catalog (declared methods, dataset infos, model names) is exactly what the torch modules
register, so validation accepts precisely what can run."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import methods
from methods.core.method import RUNS, declare_method, register_method
from methods.core.registry import DATASETS, METHODS, MODELS
from methods.data.configs import DATASET_INFOS
from methods.models.names import MODEL_NAMES


def import_every_method_module() -> None:
    for package in (methods.attacks, methods.defenses):
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package.__name__}.{info.name}")


def test_every_declared_method_has_its_run_and_every_run_is_declared():
    import_every_method_module()
    assert RUNS.names() == METHODS.names()
    for name, spec in METHODS.items():
        assert spec.run.__module__ == spec.module == f"methods.{spec.kind}s.{name}"
        assert spec.kind in ("attack", "defense")
        assert spec.config_cls.__module__ == f"methods.{spec.kind}s.configs.{name}"  # one config module each
        assert spec.doc, f"{spec.module} has no docstring for bdo list"


def test_dataset_and_model_names_match_their_registries():
    assert DATASET_INFOS.names() == DATASETS.names()
    assert list(MODEL_NAMES) == MODELS.names()
    for name, info in DATASET_INFOS.items():
        assert info.name == name


def test_declarations_refuse_duplicates_and_runs_outside_their_module():
    spec = METHODS.get("ft")
    with pytest.raises(ValueError, match="already registered"):
        declare_method("ft", kind="defense")(spec.config_cls)
    with pytest.raises(ValueError, match="belongs in methods.defenses.ft"):
        register_method("ft")(lambda ctx, cfg: None)
    with pytest.raises(KeyError, match="unknown method 'nothing'"):
        register_method("nothing")(lambda ctx, cfg: None)
