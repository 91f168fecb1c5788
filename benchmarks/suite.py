"""The benchmark cases, which rows each produces, and where it runs.

Each case runs in a fresh process (so its peak memory is its own), except the cases of a `group`, which share
one process because they share expensive state (the Ray instance and the MLflow store of the "ray" group).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CPU_MODELS = ("small_cnn", "wrn16_1")
GPU_MODELS = ("small_cnn", "wrn16_1", "preact_resnet18", "resnet18")


@dataclass(frozen=True)
class Case:
    name: str
    func: str  # "module:function" under benchmarks
    rows: tuple[str, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # importable modules beyond torch/torchvision
    gpu_only: bool = False
    group: str | None = None


GROUP_SETUP = {"ray": "benchmarks.orchestrator:ray_group"}


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for model in GPU_MODELS:
        gpu_only = model not in CPU_MODELS
        cases.append(
            Case(
                f"train.{model}",
                "benchmarks.throughput:bench_train",
                (f"train.{model}",),
                {"model": model},
                gpu_only=gpu_only,
            )
        )
    for model in GPU_MODELS:
        gpu_only = model not in CPU_MODELS
        cases.append(
            Case(
                f"train.{model}.fast",
                "benchmarks.throughput:bench_train_fast",
                (f"train.{model}.fast",),
                {"model": model},
                gpu_only=gpu_only,
            )
        )
    cases.append(
        Case(
            "train.resnet18.fast.b512",
            "benchmarks.throughput:bench_train_fast",
            ("train.resnet18.fast.b512",),
            {"model": "resnet18", "batch_size": 512},
            gpu_only=True,
        )
    )
    cases.append(
        Case(
            "share4.wrn16_1",
            "benchmarks.throughput:bench_share",
            ("share4.wrn16_1",),
            {"model": "wrn16_1", "processes": 4},
        )
    )
    for family in ("pgd", "fct"):
        for model in ("small_cnn", "wrn16_1", "resnet18"):
            cases.append(
                Case(
                    f"{family}.{model}",
                    f"benchmarks.adversarial:bench_{family}",
                    (f"{family}.{model}",),
                    {"model_name": model},
                    gpu_only=model not in CPU_MODELS,
                )
            )
    ray = ("ray", "mlflow")
    cases.append(
        Case(
            "orchestrator.epoch", "benchmarks.orchestrator:bench_epoch", ("orchestrator.epoch",), needs=ray, group="ray"
        )
    )
    cases.append(
        Case(
            "orchestrator.epoch.short",
            "benchmarks.orchestrator:bench_epoch",
            ("orchestrator.epoch.short",),
            {"short": True},
            needs=ray,
            group="ray",
        )
    )
    cases.append(
        Case("sweep", "benchmarks.orchestrator:bench_sweep", ("sweep.reuse", "sweep.naive"), needs=ray, group="ray")
    )
    cases.append(
        Case("tune.trivial", "benchmarks.orchestrator:bench_trivial", ("tune.trivial",), needs=("ray",), group="ray")
    )
    return cases


def case_by_name(name: str) -> Case:
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(name)


def select(cases: list[Case], only: str | None) -> list[Case]:
    """Cases matching a comma list of names. A token that is exactly a case or row name selects that case;
    otherwise it selects every case with a name under it ("train", "pgd", "sweep")."""
    if not only:
        return list(cases)
    chosen: set[str] = set()
    unknown = []
    for token in (t.strip() for t in only.split(",")):
        if not token:
            continue
        exact = [c for c in cases if token in (c.name, *c.rows)]
        under = [c for c in cases if any(n.startswith(token + ".") for n in (c.name, *c.rows))]
        hits = exact or under
        if not hits:
            unknown.append(token)
        chosen.update(c.name for c in hits)
    if unknown:
        raise ValueError(
            f"--only: no benchmark named {', '.join(unknown)}; "
            f"known: {', '.join(sorted({r for c in cases for r in c.rows}))}"
        )
    return [c for c in cases if c.name in chosen]


def batches(cases: list[Case]) -> list[list[Case]]:
    """Process batches in suite order: one per case, one per group (placed at its first member)."""
    out: list[list[Case]] = []
    groups: dict[str, list[Case]] = {}
    for case in cases:
        if case.group is None:
            out.append([case])
        elif case.group in groups:
            groups[case.group].append(case)
        else:
            groups[case.group] = [case]
            out.append(groups[case.group])
    return out
