"""Which device each part of a command uses, tested on a CPU machine by pretending to see GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from methods.core.context import LocalContext
from methods.core.training import CheckpointDeviceError, default_device, full_state, make_generator, restore_full_state
from orchestrator.devices import (
    ClusterShape,
    auto_gpu_share,
    check_gpu_request,
    driver_device,
    pick_device,
    resolve_gpus,
)
from orchestrator.errors import BadInput
from orchestrator.spaces import load_space, plan_sweep

SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.delenv("BDO_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_a_visible_gpu_is_the_default_everywhere(one_gpu):
    assert default_device().type == "cuda"
    assert pick_device().type == "cuda", "single runs and driver-side attack builds"
    plan = plan_sweep(load_space(SPACES / "ft.yaml"), quick=True)
    assert plan.gpus_per_trial is None, "unset means automatic"
    resolved = resolve_gpus(plan, ClusterShape.local(num_cpus=16))
    assert resolved.gpus_per_trial > 0 and pick_device(resolved.gpus_per_trial).type == "cuda"
    assert driver_device(resolved).type == "cuda"


def test_gpus_per_trial_zero_forces_the_cpu_even_with_a_gpu(one_gpu):
    plan = plan_sweep(load_space(SPACES / "ft.yaml"), quick=True, gpus_per_trial=0)
    resolved = resolve_gpus(plan, ClusterShape.local(num_cpus=16))
    assert resolved.gpus_per_trial == 0
    assert driver_device(resolved).type == "cpu" and pick_device(0).type == "cpu"


def test_bdo_device_pins_the_default(monkeypatch):
    monkeypatch.setenv("BDO_DEVICE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device().type == "cpu" and LocalContext().device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("BDO_DEVICE", "cuda")
    with pytest.raises(ValueError, match="no CUDA device"):
        default_device()


@pytest.mark.parametrize(
    "gpus, nodes, concurrent, cpus, share",
    [
        ((0.0,), (16.0,), 8, 1.0, 0.0),  # no GPU: CPU trials
        ((1.0,), (16.0,), 8, 1.0, 0.25),  # one GPU, many trials: packed, at most 4 per GPU
        ((1.0,), (16.0,), 2, 1.0, 0.5),  # two concurrent trials share it evenly
        ((1.0,), (16.0,), 1, 1.0, 1.0),  # one trial takes the whole GPU
        ((4.0,), (64.0,), 8, 1.0, 0.5),  # 8 trials on 4 GPUs
        ((8.0,), (96.0,), 4, 1.0, 1.0),  # more GPUs than trials: never more than one GPU each
        ((1.0,), (2.0,), 8, 1.0, 0.5),  # CPUs bound the concurrency to 2
    ],
)
def test_the_automatic_share(gpus, nodes, concurrent, cpus, share):
    assert auto_gpu_share(ClusterShape(gpus, nodes), concurrent, cpus) == share


def test_a_share_no_node_can_give_is_bad_input():
    with pytest.raises(BadInput, match="no node has a GPU"):
        check_gpu_request(0.5, [0.0])
    with pytest.raises(BadInput, match="the largest node has 2"):
        check_gpu_request(4, [2.0, 1.0])
    with pytest.raises(BadInput, match="whole GPUs"):
        check_gpu_request(1.5, [8.0])
    check_gpu_request(0.25, [1.0])
    check_gpu_request(None, [0.0])


def test_a_checkpoint_from_another_device_type_is_refused_with_the_reason():
    model = torch.nn.Linear(2, 2)
    state = full_state(3, {"m": model}, {}, {}, {"train": make_generator(0, torch.device("cpu"))})
    assert state["device_type"] == "cpu"
    state["device_type"] = "cuda"  # as written by a GPU run
    with pytest.raises(CheckpointDeviceError, match="taken on cuda and this run is on cpu"):
        restore_full_state(state, {"m": model}, {}, {}, {"train": make_generator(0, torch.device("cpu"))})


def test_the_attack_cache_keys_cpu_and_gpu_builds_apart():
    from methods.core.fastpath import FastPath
    from orchestrator.cache import cache_key

    config, data = {"epochs": 15, "seed": 0}, {"train_limit": None}
    on_cpu = {"device": "cpu", "fast": FastPath().resolved("cpu")}
    on_gpu = {"device": "cuda", "fast": FastPath().resolved("cuda")}
    gpu_plain = {"device": "cuda", "fast": FastPath(bf16=False).resolved("cuda")}
    keys = {cache_key("badnets", config, data, b) for b in (on_cpu, on_gpu, gpu_plain)}
    assert len(keys) == 3
    assert cache_key("badnets", config, data, on_cpu) == cache_key("badnets", dict(config), dict(data), dict(on_cpu))
