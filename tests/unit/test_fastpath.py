"""The fast path: off on CPU by default (the reference path is untouched), same maths where it is on, invisible to
checkpoints, and on a CUDA machine the fast run reaches what the CPU reference reaches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from methods.core.context import LocalContext
from methods.core.fastpath import FastForward, FastPath, accelerate
from methods.core.method import get_method
from methods.core.training import unwrap
from methods.data.embedded import DIGITS_INFO
from methods.models.base import build_model

ON_CPU = FastPath(bf16=True, channels_last=True, cudnn_benchmark=False)


def test_defaults_leave_the_cpu_model_itself():
    model = build_model("small_cnn", DIGITS_INFO)
    assert accelerate(model, "cpu", FastPath()) is model
    assert accelerate(model, "cpu", None) is model
    assert LocalContext().wrap_model(model) is model


def test_defaults_switch_everything_on_for_cuda_only():
    fast = FastPath()
    for switch in ("bf16", "channels_last", "cudnn_benchmark"):
        assert fast.wants(switch, torch.device("cuda")) and not fast.wants(switch, torch.device("cpu"))
    assert not FastPath(bf16=False).wants("bf16", torch.device("cuda"))
    assert FastPath(bf16=True).wants("bf16", torch.device("cpu"))


def test_wrapped_forward_gives_fp32_logits_close_to_the_reference_and_checkpoints_see_the_plain_model():
    torch.manual_seed(0)
    model = build_model("small_cnn", DIGITS_INFO).eval()
    x = torch.rand(64, 1, 16, 16)
    with torch.no_grad():
        reference = model(x)
    keys = list(model.state_dict())
    wrapped = accelerate(model, "cpu", ON_CPU)
    assert isinstance(wrapped, FastForward) and unwrap(wrapped) is model
    with torch.no_grad():
        fast = wrapped(x)
    assert fast.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their scale, and the predictions agree.
    assert (fast - reference).abs().max() <= 0.05 * reference.abs().max() + 1e-2
    assert (fast.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    assert list(unwrap(wrapped).state_dict()) == keys, "no wrapper prefix reaches a checkpoint"
    conv_weights = [p for p in model.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)


def test_gradients_flow_through_the_wrapper_in_fp32():
    torch.manual_seed(0)
    model = build_model("small_cnn", DIGITS_INFO)
    wrapped = accelerate(model, "cpu", ON_CPU)
    loss = F.cross_entropy(wrapped(torch.rand(16, 1, 16, 16)), torch.randint(0, 10, (16,)))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_bad_switch_values_name_the_field():
    with pytest.raises(ValueError, match="bf16"):
        FastPath.from_dict({"bf16": "maybe"})


def _digits_badnets(device: torch.device, fast: FastPath | None):
    spec = get_method("badnets")
    cfg = spec.make_config(dict(dataset="digits", model="small_cnn", epochs=15, lr=0.05, poison_rate=0.1, seed=0))
    return spec.run(LocalContext(device=device, fast=fast), cfg).metrics


@pytest.mark.slow
def test_a_method_trained_under_the_fast_path_reaches_the_reference(badnets_backdoor):
    reference = badnets_backdoor.metrics
    fast = _digits_badnets(torch.device("cpu"), ON_CPU)
    assert fast["test_acc"] >= reference["test_acc"] - 0.03
    assert fast["test_asr"] >= 0.9


@pytest.mark.gpu
def test_cuda_fast_path_matches_the_cpu_reference(badnets_backdoor):
    reference = badnets_backdoor.metrics
    on = _digits_badnets(torch.device("cuda"), None)  # the defaults: every switch on
    off = _digits_badnets(torch.device("cuda"), FastPath(bf16=False, channels_last=False, cudnn_benchmark=False))
    for metrics in (on, off):
        assert abs(metrics["test_acc"] - reference["test_acc"]) <= 0.03
        assert metrics["test_asr"] >= 0.9


class _ThreeOutputs(torch.nn.Module):
    """Shaped like NAD's student forward: extra arguments in, a tuple of logits, a list of maps and None out."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build_model("small_cnn", DIGITS_INFO)

    def forward(self, x, scale, *, extra=None):
        logits = self.model(x) * scale
        return logits, [logits.softmax(1), {"n": torch.tensor(3)}], extra


def test_wrapper_passes_any_arguments_and_casts_nested_outputs_to_fp32():
    wrapped = accelerate(_ThreeOutputs(), "cpu", ON_CPU)
    logits, (probs, counts), none = wrapped(torch.rand(8, 1, 16, 16), 2.0, extra=None)
    assert logits.dtype == probs.dtype == torch.float32
    assert counts["n"].dtype == torch.int64 and none is None


def test_wrapper_under_distributed_data_parallel(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(accelerate(_ThreeOutputs(), "cpu", ON_CPU))
        logits, (probs, _), _ = ddp(torch.rand(8, 1, 16, 16), 1.0)
        F.cross_entropy(logits, torch.randint(0, 10, (8,))).backward()
        assert logits.dtype == torch.float32 and probs.dtype == torch.float32
        assert all(p.grad is not None for p in unwrap(ddp).parameters())
    finally:
        dist.destroy_process_group()


def test_compiled_forward_serves_only_full_training_batches(monkeypatch):
    """A compiled (CUDA-graphed) forward sees one batch shape: partial batches and evaluation go eager, so a
    schedule never recompiles for its last batch. torch.compile is replaced by a recorder: the routing is what is
    tested here, the compiler is torch's."""
    calls = []

    def fake_compile(module, mode=None):
        def compiled(*args, **kwargs):
            calls.append((args[0].shape[0], mode))
            return module(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    wrapped = accelerate(
        build_model("small_cnn", DIGITS_INFO),
        "cpu",
        FastPath(bf16=False, channels_last=False, compile=True, compile_mode="reduce-overhead"),
    )
    wrapped.train()
    for batch in (32, 32, 7, 32):
        wrapped(torch.rand(batch, 1, 16, 16))
    wrapped.eval()
    wrapped(torch.rand(32, 1, 16, 16))
    assert calls == [(32, "reduce-overhead")] * 3


def test_resolved_switches_name_what_applies_on_each_device():
    fast = FastPath(compile=True, compile_mode="reduce-overhead")
    assert fast.resolved("cuda") == {
        "bf16": True,
        "channels_last": True,
        "cudnn_benchmark": True,
        "compile": "reduce-overhead",
    }
    assert FastPath().resolved("cpu") == {
        "bf16": False,
        "channels_last": False,
        "cudnn_benchmark": False,
        "compile": False,
    }
    with pytest.raises(ValueError, match="compile_mode"):
        FastPath.from_dict({"compile_mode": "fastest"})


@pytest.mark.gpu
def test_cuda_graphed_training_step_reaches_the_reference(badnets_backdoor):
    """The opt-in CUDA-graph path (torch.compile reduce-overhead) trains the same model as the eager one."""
    graphed = _digits_badnets(torch.device("cuda"), FastPath(compile=True, compile_mode="reduce-overhead"))
    assert abs(graphed["test_acc"] - badnets_backdoor.metrics["test_acc"]) <= 0.03
    assert graphed["test_asr"] >= 0.9
