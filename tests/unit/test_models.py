"""Every registered model honours the BackdoorModel contract on digit-sized and CIFAR-sized inputs.

Parametrised over `MODELS.names()` so a new model file is covered without touching this test.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import methods
from methods.core.registry import Registry
from methods.data.base import DatasetInfo
from methods.data.embedded import DIGITS_INFO, SYNTHETIC_INFO
from methods.models.base import BackdoorModel, build_model

INFOS = {"digits": DIGITS_INFO, "rgb32": SYNTHETIC_INFO}
# A Tiny-ImageNet-shaped info: 64x64 and many classes, checked forward-only to keep the file fast.
TINY_LIKE = replace(SYNTHETIC_INFO, name="tiny_like", size=64, num_classes=200)


def _images(info: DatasetInfo, n: int = 2) -> torch.Tensor:
    return torch.rand(n, info.channels, info.size, info.size)


def _build(name: str, info: DatasetInfo) -> BackdoorModel:
    torch.manual_seed(0)
    model = build_model(name, info)
    assert isinstance(model, BackdoorModel)
    return model


@pytest.fixture(params=methods.MODELS.names())
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=sorted(INFOS))
def info(request: pytest.FixtureRequest) -> DatasetInfo:
    return INFOS[request.param]


def test_contract(model_name: str, info: DatasetInfo) -> None:
    """Shapes, features and the late split, checked on one model to keep construction cost down."""
    model = _build(model_name, info).eval()
    x = _images(info)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
    assert logits.shape == (2, info.num_classes)

    assert len(feats.stages) == 3
    sizes = []
    for stage in feats.stages:
        assert stage.dim() == 4 and stage.shape[0] == 2
        sizes.append(stage.shape[-2] * stage.shape[-1])
    assert sizes == sorted(sizes, reverse=True), f"stage spatial sizes must not grow: {sizes}"
    assert feats.penultimate.shape == (2, model.feature_dim)
    assert torch.allclose(feats.logits, logits, atol=1e-5)
    assert torch.allclose(model.features(x), feats.penultimate, atol=1e-5)

    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier.in_features == model.feature_dim
    assert model.classifier.out_features == info.num_classes

    assert model.late_modules, "late_modules must name at least one submodule"
    for name in model.late_modules:
        model.get_submodule(name)
    late = {id(p) for p in model.late_parameters()}
    every = {id(p) for p in model.parameters()}
    assert late and late < every, "late parameters must be a non-empty strict subset"
    assert {id(p) for p in model.classifier.parameters()} <= late

    # Inputs are [0, 1] pixels; the model owns its normalisation, so the stats travel with state_dict.
    buffers = dict(model.named_buffers())
    assert torch.equal(buffers["normalize.mean"].flatten(), torch.tensor(info.mean))
    assert torch.equal(buffers["normalize.std"].flatten(), torch.tensor(info.std))


def test_sgd_step_changes_weights(model_name: str, info: DatasetInfo) -> None:
    model = _build(model_name, info).train()
    x, y = _images(info), torch.tensor([0, info.num_classes - 1])
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), y)
    assert torch.isfinite(loss)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters())]
    assert any(changed)
    grad = model.classifier.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    # The first layer must get gradient too: a broken skip path or a detach would starve it.
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_tiny_imagenet_sized_forward(model_name: str) -> None:
    model = _build(model_name, TINY_LIKE).eval()
    with torch.no_grad():
        feats = model.forward_features(_images(TINY_LIKE))
    assert feats.logits.shape == (2, TINY_LIKE.num_classes)
    assert feats.penultimate.shape == (2, model.feature_dim)


def test_expected_models_registered() -> None:
    for name in ("small_cnn", "preact_resnet18", "resnet18", "wrn16_1", "wrn40_2", "vgg16_bn"):
        assert name in methods.MODELS


@pytest.mark.parametrize(
    "name, params",
    [("preact_resnet18", 11_171_146), ("resnet18", 11_173_962), ("wrn16_1", 175_066), ("wrn40_2", 2_243_546)],
)
def test_parameter_counts_match_reference(name: str, params: int) -> None:
    # The published CIFAR-10 sizes of these networks; a mismatch means the architecture drifted.
    model = _build(name, SYNTHETIC_INFO)
    assert sum(p.numel() for p in model.parameters()) == params


def test_registry_refuses_duplicate_name() -> None:
    registry: Registry[object] = Registry("thing")
    registry.register("dup")(object())
    with pytest.raises(ValueError, match="already registered"):
        registry.register("dup")(object())
    assert registry.names() == ["dup"]


def test_registry_refuses_bad_name() -> None:
    registry: Registry[object] = Registry("thing")
    for bad in ("", "Upper", "with-dash", "sp ace"):
        with pytest.raises(ValueError):
            registry.add(bad, object())


def test_models_registry_refuses_reregistering_a_model() -> None:
    with pytest.raises(ValueError):
        methods.MODELS.register("resnet18")(lambda info: None)
