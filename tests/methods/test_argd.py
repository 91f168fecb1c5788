"""ARGD: its graph loss terms on toy tensors, its switches, resumption, bad configs, and efficacy on digits with
NAD and fine-tuning measured beside it on the same backdoored models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from methods.core.context import LocalContext, StopRun, deserialize_state
from methods.core.method import get_method
from methods.data.embedded import DIGITS_INFO
from methods.defenses.argd import ARGDConfig
from methods.defenses.shared.attention import TransferHeads, attention_map, edge_loss, weighted_at_loss
from methods.models.base import build_model
from tests.conftest import assert_defended

PRESETS = Path(__file__).resolve().parents[2] / "search_spaces" / "presets" / "digits"
VERTEX = [2000.0, 5000.0, 2000.0]


def preset(name: str) -> dict:
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())


def toy_maps(seed: int, batch: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [attention_map(torch.rand(batch, c, s, s, generator=g)) for c, s in ((4, 8), (8, 4), (16, 2))]


def test_vertex_and_edge_terms_vanish_when_student_equals_teacher():
    maps = toy_maps(0)
    same = [m.clone() for m in maps]
    assert weighted_at_loss(maps, same, VERTEX).item() == 0.0
    assert edge_loss(maps, same).item() == 0.0


def test_vertex_and_edge_terms_are_positive_when_student_differs():
    student, teacher = toy_maps(0), toy_maps(1)
    assert weighted_at_loss(student, teacher, VERTEX).item() > 1e-3
    assert edge_loss(student, teacher).item() > 1e-4


def test_vertex_term_pools_maps_of_different_resolutions():
    student = toy_maps(0)
    teacher = [attention_map(torch.rand(6, 3, 2 * m.shape[-1], 2 * m.shape[-1])) for m in student]
    assert torch.isfinite(weighted_at_loss(student, teacher, VERTEX))


def test_attention_maps_have_unit_norm_per_sample():
    a = attention_map(torch.randn(5, 7, 6, 6), p=2.0)
    assert a.shape == (5, 1, 6, 6)
    assert torch.allclose(a.flatten(1).norm(dim=1), torch.ones(5), atol=1e-5)


def test_transfer_term_is_finite_and_attends_over_student_layers():
    torch.manual_seed(0)
    heads = TransferHeads(3, 3, qk_dim=16)
    student, teacher = toy_maps(0), toy_maps(1)
    loss = heads(student, teacher)
    assert torch.isfinite(loss) and loss.item() > 0
    weights = heads.attention(student, teacher)
    assert weights.shape == (6, 3, 3)
    assert torch.allclose(weights.sum(dim=2), torch.ones(6, 3), atol=1e-6)
    assert heads(teacher, teacher).item() < loss.item()


@pytest.mark.parametrize("trainable", [False, True])
def test_gradients_reach_the_student_never_the_teacher_and_the_heads_only_when_trainable(trainable):
    torch.manual_seed(0)
    student, teacher = build_model("small_cnn", DIGITS_INFO), build_model("small_cnn", DIGITS_INFO)
    heads = TransferHeads(3, 3, qk_dim=16)
    heads.requires_grad_(trainable)
    x = torch.rand(8, 1, 16, 16)
    teacher.eval()
    with torch.no_grad():
        t_maps = [attention_map(s) for s in teacher.forward_features(x).stages]
    s_maps = [attention_map(s) for s in student.forward_features(x).stages]
    for term in (weighted_at_loss(s_maps, t_maps, VERTEX), edge_loss(s_maps, t_maps), heads(s_maps, t_maps)):
        student.zero_grad()
        term.backward(retain_graph=True)
        grads = [p.grad for p in student.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all((p.grad is not None) == trainable for p in heads.parameters())


def test_loss_terms_detach_teacher_maps_given_with_gradients():
    torch.manual_seed(0)
    student, teacher = build_model("small_cnn", DIGITS_INFO), build_model("small_cnn", DIGITS_INFO)
    x = torch.rand(8, 1, 16, 16)
    s_maps = [attention_map(s) for s in student.forward_features(x).stages]
    t_maps = [attention_map(s) for s in teacher.forward_features(x).stages]
    total = (
        weighted_at_loss(s_maps, t_maps, VERTEX) + edge_loss(s_maps, t_maps) + TransferHeads(3, 3, 8)(s_maps, t_maps)
    )
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())


TINY = dict(clean_ratio=0.05, teacher_epochs=2, epochs=2, qk_dim=16)


def run_argd(backdoor, ctx=None, **values):
    spec = get_method("argd")
    ctx = ctx or LocalContext(backdoor_provider=lambda: backdoor)
    return spec.run(ctx, spec.make_config({**TINY, **values})), ctx


@pytest.mark.parametrize("trainable", [False, True])
def test_heads_train_and_sit_in_the_optimizer_only_when_switched_on(trainable, badnets_backdoor):
    straight = LocalContext(backdoor_provider=lambda: badnets_backdoor, stop_after_step=2)
    with pytest.raises(StopRun):
        run_argd(badnets_backdoor, straight, trans_head_trainable=trainable)
    before = deserialize_state(straight.checkpoint)
    _, ctx = run_argd(
        badnets_backdoor,
        LocalContext(backdoor_provider=lambda: badnets_backdoor, checkpoint=straight.checkpoint),
        trans_head_trainable=trainable,
    )
    after = deserialize_state(ctx.checkpoint)
    heads_before, heads_after = before["models"]["heads"], after["models"]["heads"]
    weights = [k for k in heads_before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    changed = [k for k in weights if not torch.equal(heads_before[k], heads_after[k])]
    assert bool(changed) == trainable, changed
    # The BatchNorm statistics of the heads update either way, as in the released code.
    assert not torch.equal(heads_before["query.0.1.running_mean"], heads_after["query.0.1.running_mean"])
    n_student = len(list(build_model("small_cnn", badnets_backdoor.data.info).parameters()))
    n_heads = len([k for k in weights])
    held = sum(len(g["params"]) for g in after["optimizers"]["student"]["param_groups"])
    assert held == n_student + (n_heads if trainable else 0)


def test_scratch_wrn40_2_teacher_runs_on_a_small_cnn_student(badnets_backdoor):
    result, ctx = run_argd(badnets_backdoor, teacher_mode="scratch_wrn40_2", teacher_epochs=1, epochs=1)
    teacher_keys = deserialize_state(ctx.checkpoint)["models"]["teacher"]
    assert any(k.startswith("block3") for k in teacher_keys)  # the teacher is the WRN, the student is not
    assert not any(k.startswith("block3") for k in result.model_state)
    for key in ("loss_vert", "loss_edge", "loss_trans"):
        assert math.isfinite(ctx.last(key))


@pytest.mark.parametrize(
    "values, field",
    [
        ({"teacher_mode": "scratch"}, "teacher_mode"),
        ({"vertex_weights": [1.0, 2.0]}, "vertex_weights"),
        ({"vertex_weights": [1.0, -2.0, 3.0]}, "vertex_weights"),
        ({"lr_steps": [0.1]}, "lr_steps"),
        ({"lr_step_epochs": [6, 3]}, "lr_step_epochs"),
        ({"clean_ratio": 0.0}, "clean_ratio"),
        ({"w_edge": -1.0}, "w_edge"),
        ({"p": 0.0}, "p"),
        ({"trans_head_trainable": "yes"}, "trans_head_trainable"),
    ],
)
def test_bad_config_values_name_the_field(values, field):
    with pytest.raises(ValueError, match=field):
        ARGDConfig.from_dict(values)


def test_presets_are_valid_configs():
    for name in ("ft", "nad", "argd"):
        get_method(name).make_config(preset(name))


@pytest.mark.slow
def test_argd_erases_the_backdoor_and_nad_and_ft_are_measured_beside_it(digits_backdoor):
    before = digits_backdoor.metrics
    results = {}
    for name in ("ft", "nad", "argd"):
        spec = get_method(name)
        ctx = LocalContext(backdoor_provider=lambda: digits_backdoor)
        metrics = spec.run(ctx, spec.make_config(preset(name))).metrics
        assert [s for s, _ in ctx.reports] == list(range(1, len(ctx.reports) + 1))
        for key in ("val_acc", "val_asr", "test_acc", "test_asr", "test_der"):
            assert 0.0 <= metrics[key] <= 1.0, (name, key)
        results[name] = metrics
        print(
            f"{digits_backdoor.attack} {name}: test ACC {before['test_acc']:.3f} -> {metrics['test_acc']:.3f}, "
            f"ASR {before['test_asr']:.3f} -> {metrics['test_asr']:.3f} (val ACC {metrics['val_acc']:.3f}, "
            f"ASR {metrics['val_asr']:.3f}, DER {metrics['test_der']:.3f})"
        )
    argd = results["argd"]
    assert before["test_asr"] >= 0.9
    assert_defended(f"argd on {digits_backdoor.attack}", argd, before)
