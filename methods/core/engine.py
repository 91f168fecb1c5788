"""The training engine: a method declares its stages, the engine runs them and owns the bookkeeping.

A method builds its models, optimizers and generators, `track`s them, `keep`s whatever else it carries from step
to step (pools, candidates, counters), and hands `run` its stages in order. A stage is a name, a number of steps
and a function that trains one step and returns what to report. The engine numbers the steps from 1 across the
stages, reports each one, checkpoints everything after each (weights, optimizer and scheduler states, every
random stream and the kept values), and resumes after any step of any stage, so a run stopped
after step k and resumed ends bit for bit where an uninterrupted run ends on the same device.

Resuming replays the setup: the `begin` of every stage up to the checkpoint's runs again (so models built, frozen
or wrapped there exist as they did), kept values come back before any `begin` (a stage may be set up from them),
and the tracked state is restored after the `begin` of the checkpoint's own stage, or before the next stage's when
the checkpoint closed its stage (that stage then begins from the restored state, random streams included).

Every rank of a distributed run runs every step and reports it; the context's report is where ranks meet and
where BatchNorm statistics are averaged, so a stage that must read synchronised weights does so in `after_report`.
`ctx.wrap_model` (the fast path, DDP) is what step functions train through; the engine tracks the bare modules.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from methods.core.context import RunContext
from methods.core.schedules import set_lr
from methods.core.training import derive_seed, full_state, make_generator, restore_full_state, sgd, train_epoch

Metrics = dict[str, Any]  # name -> float or 0-d tensor (converted once, when reported)


@dataclass
class Stage:
    """`steps` steps (a number, or a function read before every step when the length depends on what the run has
    done so far); `run(i)` trains step i (0-based within the stage) and returns its metrics. With `evaluate`, the
    report is evaluate() after the step, extended by those metrics. `begin()` sets the stage up; `after_report()`
    runs once the step is reported, before it is checkpointed."""

    name: str
    steps: int | Callable[[], int]
    run: Callable[[int], Metrics]
    evaluate: Callable[[], dict[str, float]] | None = None
    begin: Callable[[], None] | None = None
    after_report: Callable[[], None] | None = None

    def length(self) -> int:
        return self.steps() if callable(self.steps) else self.steps


class Engine:
    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.kept = SimpleNamespace()
        self.step = 0  # the step being trained or last finished, counted from 1 across the stages
        self._on_resume: list[Callable[[], None]] = []

    def track(
        self,
        models: dict[str, nn.Module] | None = None,
        optimizers: dict[str, torch.optim.Optimizer] | None = None,
        schedulers: dict[str, Any] | None = None,
        generators: dict[str, torch.Generator] | None = None,
    ) -> None:
        """Checkpoint these with every step (models unwrapped: track the bare module, train the wrapped one)."""
        for mine, new in (
            (self.models, models),
            (self.optimizers, optimizers),
            (self.schedulers, schedulers),
            (self.generators, generators),
        ):
            for name, obj in (new or {}).items():
                if name in mine:
                    raise ValueError(f"engine: {name!r} is already tracked")
                mine[name] = obj

    def keep(self, **values: Any) -> SimpleNamespace:
        """Values the method carries across steps (tensors, numbers, lists, dicts), checkpointed with every step;
        returns the namespace the method reads and assigns them through."""
        for name, value in values.items():
            if hasattr(self.kept, name):
                raise ValueError(f"engine: {name!r} is already kept")
            setattr(self.kept, name, value)
        return self.kept

    def on_resume(self, fn: Callable[[], None]) -> None:
        """`fn` runs once a checkpoint is restored: it redoes what the run handed the context outside the
        checkpoint (a hand-off made by a step that will not run again)."""
        self._on_resume.append(fn)

    def epochs(
        self,
        name: str,
        epochs: int,
        model: nn.Module,
        x_uint8: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int | None = None,
        lr: float | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        evaluate: Callable[[], dict[str, float]] | None = None,
        augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        lr_at: Callable[[int], float] | None = None,
        scheduler: Any = None,
        extra: Metrics | None = None,
    ) -> Stage:
        """The most common stage, built for the method: `epochs` epochs of cross-entropy on (x, y), one epoch a
        step, trained through the context's fast path (ctx.wrap_model) and reporting `train_loss`. Every
        method that trains with plain cross-entropy trains through here (the attacks' recipe, FT, the teachers).

        - Optimizer: SGD with momentum at `lr`, or the given `optimizer`. `lr_at(epoch)` (0-based) sets its rate
          before each epoch and is reported as `lr`; a `scheduler` steps after each epoch.
        - Shuffling: a generator drawn from `seed` (for the purpose "train"), or the given `generator`.
          `augment(batch, generator)` draws from it, so it resumes with it.
        - `extra`: values reported with every step (a stage index, facts fixed before training).

        The model, optimizer, scheduler and generator are tracked under `name`."""
        if (lr is None) == (optimizer is None):
            raise ValueError(f"engine.epochs {name!r}: give either lr or optimizer")
        if (seed is None) == (generator is None):
            raise ValueError(f"engine.epochs {name!r}: give either seed or generator")
        ctx = self.ctx
        optimizer = optimizer if optimizer is not None else sgd(model.parameters(), lr)
        generator = generator if generator is not None else make_generator(derive_seed(seed, "train"), ctx.device)
        self.track(
            {name: model}, {name: optimizer}, {name: scheduler} if scheduler is not None else None, {name: generator}
        )
        wrapped = ctx.wrap_model(model)
        batch_augment = None if augment is None else (lambda xb: augment(xb, generator))

        def one_epoch(epoch: int) -> Metrics:
            metrics: Metrics = {}
            if lr_at is not None:
                metrics["lr"] = torch.tensor(lr_at(epoch))
                set_lr(optimizer, lr_at(epoch))
            metrics["train_loss"] = train_epoch(
                wrapped,
                optimizer,
                x_uint8,
                y,
                batch_size,
                generator,
                batch_augment,
                rank=ctx.rank,
                world_size=ctx.world_size,
            )
            if scheduler is not None:
                scheduler.step()
            return {**metrics, **(extra or {})}

        return Stage(name, epochs, one_epoch, evaluate)

    def run(self, stages: Sequence[Stage]) -> tuple[int, dict[str, float]]:
        """Run (or resume) the stages. Returns (step, metrics) of the last report, for final_result to compare the
        returned model against. A resumed run with nothing left to train returns the report its checkpoint closed:
        the restored weights are that step's, so final_result finds nothing new to report, and a run retried after
        its last checkpoint logs no extra step (a checkpoint without one gives {}, and the result is reported once
        more)."""
        ctx = self.ctx
        state = ctx.load_state()
        start = 0 if state is None else int(state["step"])
        last: tuple[int, dict[str, float]] = (start, {} if state is None else dict(state["extra"].get("report", {})))
        if state is not None:
            for name, value in state["extra"]["kept"].items():
                setattr(self.kept, name, _to_device(value, ctx.device))
        pending = state  # restored at the first point the interrupted run had reached

        def total() -> int:
            return sum(stage.length() for stage in stages)

        expected = total()
        ctx.expect_steps(expected)
        first = 1
        for stage in stages:
            if stage.length() == 0:
                continue
            if pending is not None and start == first - 1:  # the checkpoint closed the previous stage
                self._restore(pending)
                pending = None
            if stage.begin is not None:
                stage.begin()
            if len(stages) > 1 and start < first + stage.length() - 1:
                # one line a stage: each step's metrics are already printed where the context shows reports
                ctx.progress(f"{stage.name}: steps {first}-{first + stage.length() - 1}")
            if pending is not None and start < first - 1 + stage.length():  # the checkpoint is inside this stage
                self._restore(pending)
                pending = None
            i = 0
            while i < stage.length():
                step = first + i
                if step > start:
                    last = self._step(stage, i, step)
                    if total() != expected:  # a stage grew or shrank (PBE's reruns of step 0)
                        expected = total()
                        ctx.expect_steps(expected)
                i += 1
            first += stage.length()
        if pending is not None:  # the checkpoint closed the last stage
            self._restore(pending)
        return last

    def _step(self, stage: Stage, i: int, step: int) -> tuple[int, dict[str, float]]:
        ctx = self.ctx
        self.step = step
        metrics = stage.run(i)
        if stage.evaluate is not None:
            metrics = {**stage.evaluate(), **metrics}
        report = {k: float(v) for k, v in metrics.items()}
        ctx.report(report, step=step)
        if stage.after_report is not None:
            stage.after_report()
        ctx.save_state(
            full_state(
                step,
                self.models,
                self.optimizers,
                self.schedulers,
                self.generators,
                extra={"stage": stage.name, "kept": _to_cpu(vars(self.kept)), "report": report},
            )
        )
        return step, report

    def _restore(self, state: dict[str, Any]) -> None:
        self.step = restore_full_state(state, self.models, self.optimizers, self.schedulers, self.generators)
        for fn in self._on_resume:
            fn()


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
