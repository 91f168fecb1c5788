"""The engine on a toy run, where every rule of a resume shows: stages whose setup draws from the global RNG and
changes the weights, a stage whose length grows while it runs, kept values a later stage is set up from."""

from __future__ import annotations

import pytest
import torch

from methods.core.context import LocalContext, StopRun
from methods.core.engine import Engine, Stage


def toy_run(ctx: LocalContext) -> tuple[torch.Tensor, list[str]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    engine = Engine(ctx)
    engine.track({"model": model}, {"opt": opt}, generators={"g": g})
    kept = engine.keep(extra_steps=0, mean=None)
    resumed: list[str] = []
    engine.on_resume(lambda: resumed.append("restored"))

    def train(i: int) -> dict[str, torch.Tensor]:
        x = torch.randn(8, 3, generator=g) + torch.randn(8, 3)  # both the generator and the global stream
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def grow(i: int) -> dict[str, float]:
        if i == 0:
            kept.extra_steps = 2  # the stage decides it needs more steps
        kept.mean = model.weight.detach().mean()
        return {"mean": float(kept.mean)}

    def reset_bias() -> None:  # a setup that draws from the global RNG and changes the weights
        with torch.no_grad():
            model.bias.copy_(torch.randn(1) if kept.mean is None else kept.mean.reshape(1))

    stages = [
        Stage("a", 2, train),
        Stage("empty", 0, train),
        Stage("b", lambda: 1 + kept.extra_steps, grow),
        Stage("c", 2, train, begin=reset_bias),
    ]
    engine.run(stages)
    return torch.cat([model.weight.flatten(), model.bias]), resumed


def test_a_toy_run_resumes_bit_identically_after_every_step():
    straight = LocalContext()
    expected, _ = toy_run(straight)
    steps = [s for s, _ in straight.reports]
    assert steps == list(range(1, 8)), "a: 2, b: 1 + 2 grown, c: 2; the empty stage takes none"
    for k in steps:
        interrupted = LocalContext(stop_after_step=k)
        with pytest.raises(StopRun):
            toy_run(interrupted)
        resumed = LocalContext(checkpoint=interrupted.checkpoint)
        weights, restored = toy_run(resumed)
        assert torch.equal(weights, expected), f"resumed after step {k}"
        assert interrupted.reports + resumed.reports == straight.reports
        assert restored == ["restored"]


def test_tracking_or_keeping_a_name_twice_is_refused():
    engine = Engine(LocalContext())
    engine.track({"m": torch.nn.Linear(1, 1)})
    with pytest.raises(ValueError, match="already tracked"):
        engine.track({"m": torch.nn.Linear(1, 1)})
    engine.keep(x=1)
    with pytest.raises(ValueError, match="already kept"):
        engine.keep(x=2)


def test_the_epochs_stage_takes_either_an_lr_or_an_optimizer():
    model = torch.nn.Linear(4, 2)
    x, y = torch.zeros(8, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    for extra in ({}, {"lr": 0.1, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}):
        with pytest.raises(ValueError, match="either lr or optimizer"):
            Engine(LocalContext()).epochs("fit", 1, model, x, y, batch_size=4, seed=0, **extra)
