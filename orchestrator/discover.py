"""What exists and what a command would do, without running anything: `bdo list`, `bdo describe` and the text
that `--dry-run` prints. Nothing here starts Ray or opens an MLflow store."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import yaml

from methods.core.method import METHODS, method_names
from methods.core.registry import DATASETS, MODELS
from orchestrator.errors import BadInput
from orchestrator.resolve import PRESETS, ROOT, SEARCH_SPACES, read_yaml

KINDS = ("attacks", "defenses", "datasets", "models")


def summary(text: str, limit: int = 160) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    paragraph = " ".join(text.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    sentence = paragraph if end < 0 else paragraph[: end + 1]
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


def _first_line(obj: Any) -> str:
    """The builder's own summary, else its module's (most model builders are one-line functions)."""
    return summary(inspect.getdoc(obj) or inspect.getdoc(inspect.getmodule(obj)) or "")


def _method_summary(name: str) -> str:
    return summary(METHODS.get(name).doc)


def list_lines(kind: str | None = None) -> list[str]:
    """One line per registered attack, defense, dataset or model, with its one-line summary."""
    if kind is not None and kind not in KINDS:
        raise BadInput(f"bdo list {kind}: choose one of {', '.join(KINDS)}")
    sections = {
        "attacks": [(n, _method_summary(n)) for n in method_names("attack")],
        "defenses": [(n, _method_summary(n)) for n in method_names("defense")],
        "datasets": [(n, _first_line(DATASETS.get(n))) for n in DATASETS.names()],
        "models": [(n, _first_line(MODELS.get(n))) for n in MODELS.names()],
    }
    lines: list[str] = []
    for name in [kind] if kind else KINDS:
        if not kind:
            lines.append(f"{name}:")
        width = max((len(n) for n, _ in sections[name]), default=0)
        lines += [f"{'  ' if not kind else ''}{n:<{width}}  {summary}" for n, summary in sections[name]]
    return lines


def _type_name(annotation: Any) -> str:
    return (
        str(annotation).replace("typing.", "").replace("Optional[", "").rstrip("]")
        if "Optional" in str(annotation)
        else getattr(annotation, "__name__", str(annotation))
    )


def describe_lines(name: str) -> list[str]:
    """Every config field of a method (type, default, allowed values, help), its presets and its search space."""
    if name not in METHODS:
        raise BadInput(f"bdo describe {name}: unknown method; `bdo list` shows what exists")
    spec = METHODS.get(name)
    cfg = spec.config_cls()
    lines = [f"{name} ({spec.kind}): {_method_summary(name)}", "", "config (set with --set KEY=VALUE):"]
    for f in dataclasses.fields(cfg):
        if f.name.startswith("_"):
            continue
        meta = f.metadata
        allowed = ""
        if "choices" in meta:
            allowed = "one of " + ", ".join(map(str, meta["choices"]))
        elif "range" in meta:
            lo, hi = meta["range"]
            allowed = f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
        default = getattr(cfg, f.name)
        text = f"  {f.name}: {f.type if isinstance(f.type, str) else _type_name(f.type)} = {default!r}"
        extra = "; ".join(p for p in (allowed, meta.get("doc", "")) if p)
        lines.append(text + (f"  ({extra})" if extra else ""))
    presets = sorted(list(PRESETS.glob(f"*/{name}.yaml")) + list(PRESETS.glob(f"*/*/{name}.yaml")))
    lines += ["", "presets (applied automatically for their dataset; --no-preset turns them off):"]
    lines += [f"  {p.parent.relative_to(PRESETS)}: {p.relative_to(ROOT)}" for p in presets] or ["  none"]
    space = SEARCH_SPACES / f"{name}.yaml"
    lines += ["", "search space:"]
    if space.is_file():
        raw = read_yaml(space.read_text()) or {}
        lines.append(f"  {space.relative_to(ROOT)}: {raw.get('description', '')}")
        for key, dist in (raw.get("space") or {}).items():
            lines.append(f"    {key}: {dist}")
        objective = raw.get("objective") or {}
        if objective:
            bounds = objective.get("subject_to") or {}
            subject = (
                " subject to " + ", ".join(f"{k} <= {v}" for k, v in bounds.items())
                if isinstance(bounds, dict) and bounds
                else ""
            )
            lines.append(f"  objective: {objective.get('mode', 'max')} {objective.get('metric')}{subject}")
    else:
        lines.append("  none")
    return lines


def plan_text(plans: list, resources: dict[str, Any]) -> str:
    """The resolved configuration of one or more sweeps, as YAML a person can read."""
    out = []
    for plan in plans:
        base = plan.base
        out.append(
            {
                "method": base.method,
                "kind": base.kind,
                "space": str(plan.space.path),
                "config": base.config,
                "attack": base.attack,
                "attack_config": base.attack_config,
                "data": base.data_config,
                "fast": base.fast_config or "defaults (on for CUDA, off on CPU)",
                "presets": base.presets,
                "pinned": plan.pinned,
                "tuned": {d.key: {d.kind: d.args} for d in plan.tuned},
                "search": {
                    "searcher": plan.searcher,
                    "scheduler": plan.scheduler,
                    "objective": plan.objective,
                    "knowledge": plan.knowledge,
                    "metric": f"{plan.space.mode} {plan.space.metric}",
                    **(
                        {"subject_to": plan.constraints, "tune_metric": f"{plan.tune_mode} {plan.tune_metric}"}
                        if plan.constraints
                        else {}
                    ),
                    "num_samples": plan.num_samples,
                    "max_concurrent": plan.max_concurrent,
                },
                "resources": {
                    "cpus_per_trial": plan.cpus_per_trial,
                    "gpus_per_trial": plan.gpus_per_trial,
                    "workers_per_trial": plan.workers_per_trial,
                    **resources,
                },
            }
        )
    return yaml.safe_dump(out if len(out) > 1 else out[0], sort_keys=False, default_flow_style=False)
