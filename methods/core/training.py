"""Training plumbing shared by every method: seeds, generators, minibatches over device-resident tensors,
full-state checkpoints, and one supervised epoch.

Randomness comes only from explicit generators (shuffling and augmentation) whose states go into every
checkpoint together with the global RNG states, so a run interrupted after epoch k and resumed ends with the
same weights, bit for bit on CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.core.hardware import default_device_name


def derive_seed(seed: int, purpose: str) -> int:
    """A stable 31-bit seed for one purpose, so data split, poison indices, training and clean-subset draws
    are independent but all follow from one user seed."""
    digest = hashlib.sha256(f"bdo:{int(seed)}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_seed(seed: int, purpose: str, explicit: int | None) -> int:
    return int(explicit) if explicit is not None else derive_seed(seed, purpose)


def default_device() -> torch.device:
    """`default_device_name()` (BDO_DEVICE, else the first visible GPU, else the CPU) as a torch device."""
    name = default_device_name()
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"BDO_DEVICE={name!r}: use cpu, cuda or cuda:N") from None


class CheckpointDeviceError(ValueError):
    """A checkpoint taken on one device type offered to a run on another."""


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DistributedDataParallel and the fast path's wrapper (checkpoints store it)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    return x_uint8.float().div_(255.0)


def minibatches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Index batches over n samples: a shuffled order when a generator is given. Under DDP every rank draws the
    same order and takes its share of each global batch, so the global batch size stays `batch_size`."""
    order = (
        torch.randperm(n, generator=generator, device=device)
        if generator is not None
        else torch.arange(n, device=device)
    )
    stop = n - (n % batch_size) if drop_last else n
    for start in range(0, stop, batch_size):
        batch = order[start : start + batch_size]
        if world_size > 1:
            if len(batch) < world_size:  # every rank must take the same number of steps, or DDP hangs
                continue
            batch = batch[rank::world_size]
        if len(batch):
            yield batch


@torch.no_grad()
def predict_logits(model: nn.Module, x_uint8: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Eval-mode logits for uint8 images (restores the previous train/eval mode)."""
    was_training = model.training
    model.eval()
    out = [model(to_float(x_uint8[i : i + batch_size])) for i in range(0, len(x_uint8), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def predict_features(model: nn.Module, x_float: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was_training = model.training
    model.eval()
    inner = unwrap(model)
    out = [inner.features(x_float[i : i + batch_size]) for i in range(0, len(x_float), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def rng_snapshot(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_restore(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def full_state(
    step: int,
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    generators: dict[str, torch.Generator],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a resumed run needs: weights, optimizer and scheduler states, RNG states and the step, and the
    device type its generators live on (their states differ in size and stream between CPU and CUDA)."""
    return {
        "step": int(step),
        "device_type": _generator_device_type(generators),
        "models": {k: unwrap(m).state_dict() for k, m in models.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        "rng": rng_snapshot(generators),
        "extra": extra or {},
    }


def restore_full_state(
    state: dict[str, Any],
    models: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    schedulers: dict[str, Any],
    generators: dict[str, torch.Generator],
) -> int:
    """Load a `full_state` checkpoint in place; returns the step it was taken after. A checkpoint from another
    device type is refused before anything is loaded: its random streams cannot continue on this device, so the
    resumed run would silently differ from the interrupted one."""
    saved, here = state.get("device_type"), _generator_device_type(generators)
    if saved is not None and here is not None and saved != here:
        raise CheckpointDeviceError(
            f"this checkpoint was taken on {saved} and this run is on {here}: resume it on a "
            f"{saved} machine (BDO_DEVICE={saved}, or --gpus-per-trial 0 for cpu), or start "
            "the run afresh"
        )
    for k, m in models.items():
        unwrap(m).load_state_dict(state["models"][k])
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    rng_restore(state["rng"], generators)
    return int(state["step"])


def _generator_device_type(generators: dict[str, torch.Generator]) -> str | None:
    types = {g.device.type for g in generators.values()}
    return types.pop() if len(types) == 1 else None


def sgd(
    params, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False
) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


# a batch -> its loss, or (loss, {name: term reported beside it})
BatchLoss = Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]


def descend(optimizer: torch.optim.Optimizer, batches: Iterable[Any], batch_loss: BatchLoss) -> dict[str, torch.Tensor]:
    """The inner loop every trainer shares. For each batch, `batch_loss(batch)` gives the loss to minimise, or
    (loss, {name: term}) with terms to report beside it; the gradients are zeroed, the loss backpropagated, the
    optimizer stepped. Returns the epoch means, the loss's as `train_loss`, as device tensors, so the caller
    decides when to synchronise with the host (no .item() per step); {} when there was no batch."""
    totals: dict[str, torch.Tensor] = {}
    steps = 0
    for batch in batches:
        out = batch_loss(batch)
        loss, terms = out if isinstance(out, tuple) else (out, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"train_loss": loss, **terms}.items():
            totals[name] = totals[name] + value.detach() if name in totals else value.detach()
        steps += 1
    return {name: total / steps for name, total in totals.items()}


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """One supervised epoch over device-resident uint8 images. Returns the mean loss as a tensor, so the caller
    decides when to synchronise with the host (no .item() per step)."""
    model.train()

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        xb = to_float(x_uint8[idx])
        return loss_fn(model(augment(xb) if augment is not None else xb), y[idx])

    batches = minibatches(len(y), batch_size, generator, x_uint8.device, rank=rank, world_size=world_size)
    means = descend(optimizer, batches, batch_loss)
    return means.get("train_loss", torch.zeros((), device=x_uint8.device))
