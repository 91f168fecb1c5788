"""Search-space YAML files (docs/search-spaces.md): load, validate against the method's config, and turn
into a Ray Tune param_space, searcher and scheduler.

Validation happens here, before Ray starts: unknown keys, malformed distributions, ranges outside what the
config accepts, low > high, unknown metrics or modes all fail with one line naming the file and the field.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.core.knowledge import (
    BLIND,
    KNOWLEDGE_LEVELS,
    ORACLE,
    bare_name,
    blind_metrics,
    classified,
    knowledge_of,
)
from methods.core.method import METHODS
from methods.data.configs import DataConfig
from orchestrator.errors import BadInput
from orchestrator.objective import (
    CONSTRAINTS,
    DEFAULT_DEFENSE_OBJECTIVE,
    OBJECTIVE_METRIC,
    describe,
)
from orchestrator.resolve import (
    RunSpec,
    build_config,
    config_fields,
    load_yaml,
    method_spec,
    resolve_run,
    split_keys,
)

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid", "derived")
TOP_LEVEL = {
    "method",
    "description",
    "dataset",
    "model",
    "attack",
    "data",
    "fixed",
    "space",
    "objective",
    "scheduler",
    "searcher",
    "num_samples",
    "max_concurrent",
    "resources",
    "quick",
    "knowledge",
    "recipe",
}
SEARCHERS = ("random", "grid", "optuna")
SCHEDULERS = ("fifo", "asha")
OBJECTIVES = ("single", "pareto")
PARETO_METRICS = (("val_acc", "max"), ("val_asr", "min"))
REPORTED = {
    "val_acc",
    "val_asr",
    "val_ra",
    "val_der",
    "test_acc",
    "test_asr",
    "test_ra",
    "test_der",
    "split_poison_precision",
    "split_poison_recall",
    "split_clean_precision",
    "split_clean_recall",
    "split_auroc",
    "pool_clean_size",
    "pool_poison_size",
    "pool_clean_poisoned_frac",
}

_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
    ast.FloorDiv: operator.floordiv,
}


def parse_expression(text: str, source: str) -> ast.Expression:
    try:
        tree = ast.parse(str(text), mode="eval")
    except SyntaxError:
        raise BadInput(f"{source}: derived expression {text!r} is not valid arithmetic") from None
    for node in ast.walk(tree):
        allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call) + tuple(_OPS)
        if not isinstance(node, allowed):
            raise BadInput(
                f"{source}: derived expression {text!r} may use numbers, keys, + - * / ** and min/max/round only"
            )
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in ("min", "max", "round", "int")
        ):
            raise BadInput(f"{source}: derived expression {text!r} may call only min, max, round and int")
    return tree


def evaluate_expression(tree: ast.Expression, values: dict[str, Any]) -> Any:
    funcs = {"min": min, "max": max, "round": round, "int": int}

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp):
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp):
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Call):
            return funcs[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(node)

    return ev(tree)


def expression_names(tree: ast.Expression) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id not in ("min", "max", "round", "int")}


@dataclass
class Dimension:
    key: str
    kind: str
    args: Any
    tree: ast.Expression | None = None

    def samples(self) -> list[Any]:
        """Values that together exercise the dimension's extremes (for validation before anything starts)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        if self.kind in ("uniform", "loguniform"):
            return [self.args[0], self.args[1]]
        return []

    def contains(self, value: Any) -> bool:
        """Whether the distribution can draw `value`."""
        if self.kind in ("choice", "grid"):
            return value in self.args
        if self.kind == "randint":
            return _number(value) and value == int(value) and self.args[0] <= value < self.args[1]
        if self.kind in ("uniform", "loguniform"):
            return _number(value) and self.args[0] <= value <= self.args[1]
        return False


@dataclass
class SearchSpace:
    path: Path
    method: str
    dataset: str
    model: str
    attack: str
    attack_values: dict[str, Any]
    data_values: dict[str, Any]
    fixed: dict[str, Any]
    dims: list[Dimension]
    metric: str
    mode: str
    scheduler: str
    grace_period: int
    max_t: int | None
    reduction_factor: int
    searcher: str
    num_samples: int
    max_concurrent: int | None
    resources: dict[str, float]
    quick: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    knowledge: str = ORACLE  # what the objective may know (methods/core/knowledge.py); --knowledge overrides
    recipe: str | None = None  # a named recipe of the dataset's presets (--recipe overrides)
    # objective.subject_to: constraint metric -> upper bound (orchestrator/objective.py); empty: unconstrained
    constraints: dict[str, float] = field(default_factory=dict)

    @property
    def tuned(self) -> list[Dimension]:
        return [d for d in self.dims if d.kind != "derived"]

    @property
    def derived(self) -> list[Dimension]:
        return [d for d in self.dims if d.kind == "derived"]


def _expect(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise BadInput(f"{source}: {message}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_dimension(key: str, spec: Any, source: str) -> Dimension:
    src = f"{source}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise BadInput(
            f"{src}: expected one distribution, e.g. {{uniform: [0.1, 0.4]}}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise BadInput(f"{src}: unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if kind == "derived":
        return Dimension(key, kind, str(args), parse_expression(args, src))
    if kind in ("choice", "grid"):
        _expect(isinstance(args, list) and len(args) > 0, src, f"{kind} takes a non-empty list of values")
        return Dimension(key, kind, list(args))
    _expect(
        isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args),
        src,
        f"{kind} takes [low, high] numbers",
    )
    low, high = args
    _expect(
        low <= high if kind != "randint" else low < high,
        src,
        f"low {low} must be {'<' if kind == 'randint' else '<='} high {high}",
    )
    if kind == "loguniform":
        _expect(low > 0, src, f"loguniform needs low > 0 (got {low})")
    if kind == "randint":
        _expect(all(float(a).is_integer() for a in args), src, "randint takes integer bounds [low, high) ")
        args = [int(low), int(high)]
    return Dimension(key, kind, [float(a) if kind != "randint" else a for a in args])


def load_space(path: Path) -> SearchSpace:
    path = Path(path)
    raw = load_yaml(path, "search space")
    source = str(path)
    _expect(isinstance(raw, dict), source, "a search space is a mapping with at least 'method' and 'space'")
    unknown = sorted(set(raw) - TOP_LEVEL)
    _expect(not unknown, source, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(TOP_LEVEL))}")
    _expect("method" in raw, source, "missing 'method'")
    method = str(raw["method"])
    method_spec(method, None, source)
    fields = config_fields(method)

    attack_block = dict(raw.get("attack") or {})
    _expect(isinstance(attack_block, dict), source, "attack: expected a mapping {name: ..., KEY: value}")
    attack = str(attack_block.pop("name", "badnets")) if METHODS.get(method).kind == "defense" else method

    fixed = raw.get("fixed") or {}
    _expect(isinstance(fixed, dict), source, "fixed: expected a mapping of config keys to values")
    space_raw = raw.get("space") or {}
    _expect(isinstance(space_raw, dict), source, "space: expected a mapping of config keys to distributions")
    dims = [parse_dimension(str(k), v, source) for k, v in space_raw.items()]
    for key in list(fixed) + [d.key for d in dims]:
        _expect(
            key in fields, source, f"space/fixed key {key!r} is not a field of {method}; known: {', '.join(fields)}"
        )
    overlap = set(fixed) & {d.key for d in dims}
    _expect(not overlap, source, f"{', '.join(sorted(overlap))} is both fixed and searched")
    derived = [d.key for d in dims if d.tree is not None]
    for d in dims:
        if d.tree is not None:
            names = expression_names(d.tree)
            missing = names - set(fields)
            _expect(
                not missing, f"{source}: space.{d.key}", f"derived from unknown key(s) {', '.join(sorted(missing))}"
            )
            # derived keys are filled in file order (apply_derived): a later one (or itself, or a cycle) would be
            # read at its underived value
            later = sorted(names & set(derived[derived.index(d.key) :]))
            _expect(
                not later,
                f"{source}: space.{d.key}",
                f"derived from {', '.join(later)}, which {'is' if len(later) == 1 else 'are'} derived at or "
                f"after {d.key}; a derived key may use only derived keys listed before it (no cycles)",
            )

    defense = METHODS.get(method).kind == "defense"
    # a defense space without an objective is held to the bar (orchestrator/objective.py); an attack's stays val_der
    objective = raw.get("objective") or (DEFAULT_DEFENSE_OBJECTIVE if defense else {"metric": "val_der", "mode": "max"})
    _expect(
        isinstance(objective, dict),
        source,
        "objective: expected {metric: NAME, mode: max|min} (defenses: optionally subject_to: {val_acc_drop: B})",
    )
    extra = sorted(set(objective) - {"metric", "mode", "subject_to"})
    _expect(
        not extra, source, f"objective: unknown key(s) {', '.join(map(str, extra))}; allowed: metric, mode, subject_to"
    )
    metric, mode = str(objective.get("metric", "val_der")), str(objective.get("mode", "max"))
    constraints = parse_constraints(objective.get("subject_to"), "subject_to" in objective, defense, method, source)
    _expect(not metric.startswith("test_"), source, "objective.metric: tuning reads validation metrics only (val_*)")
    _expect(
        metric in REPORTED or metric.startswith("val_"),
        source,
        f"objective.metric {metric!r} is not a validation metric; "
        f"e.g. {', '.join(sorted(m for m in REPORTED if m.startswith('val_')))}",
    )
    # a metric no run reports would have every trial score NaN and the sweep select on nothing: the names a
    # method can report are those methods/core/knowledge.py classifies; split metrics only from a splitting method
    _expect(
        classified(metric) or metric in CONSTRAINTS,
        source,
        f"objective.metric {metric!r}: no method reports it; e.g. "
        f"{', '.join(sorted(m for m in REPORTED if m.startswith('val_')))} (all: methods/core/knowledge.py)",
    )
    _expect(
        not bare_name(metric).startswith("split_") or METHODS.get(method).splits_samples,
        source,
        f"objective.metric {metric!r}: {method} does not split the training set, so it reports no split_* metric",
    )
    _expect(mode in ("max", "min"), source, f"objective.mode {mode!r}: use max or min")

    sched = raw.get("scheduler") or {}
    _expect(isinstance(sched, dict), source, "scheduler: expected {name: fifo|asha, grace_period: N}")
    scheduler = str(sched.get("name", "fifo"))
    _expect(scheduler in SCHEDULERS, source, f"scheduler.name {scheduler!r}: use {' or '.join(SCHEDULERS)}")
    grace = sched.get("grace_period", 1)
    _expect(
        isinstance(grace, int) and grace >= 1, source, "scheduler.grace_period: a positive integer (counts reports)"
    )
    max_t = sched.get("max_t")
    _expect(
        max_t is None or (isinstance(max_t, int) and max_t >= grace),
        source,
        "scheduler.max_t: an integer >= grace_period",
    )
    rf = sched.get("reduction_factor", 2)
    _expect(isinstance(rf, int) and rf >= 2, source, "scheduler.reduction_factor: an integer >= 2")

    searcher = str(raw.get("searcher", "random"))
    _expect(searcher in SEARCHERS, source, f"searcher {searcher!r}: use one of {', '.join(SEARCHERS)}")
    num_samples = raw.get("num_samples", 4)
    _expect(isinstance(num_samples, int) and num_samples >= 1, source, "num_samples: a positive integer")
    max_conc = raw.get("max_concurrent")
    _expect(
        max_conc is None or (isinstance(max_conc, int) and max_conc >= 1), source, "max_concurrent: a positive integer"
    )
    resources = raw.get("resources") or {}
    _expect(
        isinstance(resources, dict) and set(resources) <= {"cpus_per_trial", "gpus_per_trial", "workers_per_trial"},
        source,
        "resources: allowed keys cpus_per_trial, gpus_per_trial, workers_per_trial",
    )
    quick = raw.get("quick") or {}
    _expect(isinstance(quick, dict), source, "quick: expected a mapping of config keys to values")
    data_values = raw.get("data") or {}
    _expect(isinstance(data_values, dict), source, "data: expected a mapping of dataset options")
    knowledge = str(raw.get("knowledge", ORACLE))
    _expect(knowledge in KNOWLEDGE_LEVELS, source, f"knowledge {knowledge!r}: use {' or '.join(KNOWLEDGE_LEVELS)}")

    return SearchSpace(
        path=path,
        method=method,
        dataset=str(raw.get("dataset", "digits")),
        model=str(raw.get("model", "small_cnn")),
        attack=attack,
        attack_values=attack_block,
        data_values=dict(data_values),
        fixed=dict(fixed),
        dims=dims,
        metric=metric,
        mode=mode,
        scheduler=scheduler,
        grace_period=grace,
        max_t=max_t,
        reduction_factor=rf,
        searcher=searcher,
        num_samples=num_samples,
        max_concurrent=max_conc,
        resources={k: float(v) for k, v in resources.items()},
        quick=dict(quick),
        description=str(raw.get("description", "")),
        knowledge=knowledge,
        recipe=str(raw["recipe"]) if raw.get("recipe") else None,
        constraints=constraints,
    )


def parse_constraints(value: Any, given: bool, defense: bool, method: str, source: str) -> dict[str, float]:
    """objective.subject_to: {NAME: BOUND} with NAME a known constraint and BOUND a fraction in [0, 1]."""
    if not given:
        return {}
    src = f"{source}: objective.subject_to"
    known = ", ".join(sorted(CONSTRAINTS))
    _expect(defense, src, f"{method} is an attack; constraints ({known}) measure a defense against the suspect model")
    _expect(
        isinstance(value, dict) and len(value) > 0,
        src,
        f"expected a mapping {{NAME: BOUND}}, e.g. {{val_acc_drop: 0.02}}; known constraints: {known}",
    )
    out: dict[str, float] = {}
    for name, bound in value.items():
        _expect(
            name in CONSTRAINTS,
            src,
            f"unknown constraint {name!r}; known: {known} ({'; '.join(f'{k}: {v}' for k, v in CONSTRAINTS.items())})",
        )
        _expect(_number(bound) and math.isfinite(bound), src, f"{name}: the bound {bound!r} is not a number")
        _expect(0 <= bound <= 1, src, f"{name}: the bound {bound:g} is outside [0, 1] (a fraction: 0.02 is 2 points)")
        out[str(name)] = float(bound)
    return out


def apply_derived(space: SearchSpace, values: dict[str, Any]) -> dict[str, Any]:
    """Fill in derived keys (in file order, so a derived key may use an earlier one)."""
    out = dict(values)
    fields = config_fields(space.method)
    for d in space.derived:
        value = evaluate_expression(d.tree, out)
        annotation = str(fields[d.key].type)
        out[d.key] = int(round(value)) if annotation.startswith("int") or annotation == "<class 'int'>" else value
    return out


@dataclass
class SweepPlan:
    """A validated sweep: the space, the run it is based on, CLI overrides already applied."""

    space: SearchSpace
    base: RunSpec  # the run with every fixed value (tuned keys at their defaults)
    searcher: str
    scheduler: str
    objective: str
    num_samples: int
    max_concurrent: int | None
    cpus_per_trial: float
    gpus_per_trial: float | None  # None: chosen from the cluster when the sweep starts (orchestrator.devices)
    workers_per_trial: int
    pinned: dict[str, Any] = field(default_factory=dict)
    default_trial: bool = True
    knowledge: str = ORACLE  # the level the sweep selects under; every run of it is tagged with it

    @property
    def tuned(self) -> list[Dimension]:
        return [d for d in self.space.tuned if d.key not in self.pinned]

    @property
    def objective_metrics(self) -> list[str]:
        """Every metric the sweep selects on (constraint metrics included)."""
        if self.objective == "pareto":
            return [m for m, _ in PARETO_METRICS]
        return [self.space.metric, *self.constraints]

    @property
    def constraints(self) -> dict[str, float]:
        """The constraints of a single-objective sweep: `--objective pareto` replaces the space's objective, its
        constraints included (a front over val ACC and val ASR is the trade-off a bound would cut)."""
        return dict(self.space.constraints) if self.objective == "single" else {}

    @property
    def tune_metric(self) -> str:
        """The one metric Tune's scheduler and searcher see: val_objective under a constraint, else the metric."""
        return OBJECTIVE_METRIC if self.constraints else self.space.metric

    @property
    def tune_mode(self) -> str:
        return "min" if self.constraints else self.space.mode

    @property
    def objective_text(self) -> str:
        """`min val_asr subject to val_acc_drop <= 0.02`."""
        return describe(self.space.metric, self.space.mode, self.constraints)


def default_point(plan: SweepPlan) -> dict[str, Any] | None:
    """The tuned keys at the values a plain run would use (the preset, else the paper's defaults), evaluated as
    the first trial so the selected trial never scores below not tuning on validation. None where that point is not in
    the space (a default outside its range), where the user turned it off, or for grids, which enumerate anyway."""
    if not plan.default_trial or plan.searcher == "grid" or any(d.kind == "grid" for d in plan.tuned):
        return None
    point = {d.key: plan.base.config.get(d.key) for d in plan.tuned}
    if not point or not all(d.contains(point[d.key]) for d in plan.tuned):
        return None
    return point


def plan_sweep(
    space: SearchSpace,
    *,
    dataset: str | None = None,
    model: str | None = None,
    seed: int | None = None,
    attack: str | None = None,
    sets: dict[str, Any] | None = None,
    use_preset: bool = True,
    quick: bool = False,
    searcher: str | None = None,
    scheduler: str | None = None,
    objective: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    workers_per_trial: int | None = None,
    default_trial: bool = True,
    knowledge: str | None = None,
    recipe: str | None = None,
) -> SweepPlan:
    source = str(space.path)
    sets = dict(sets or {})
    quick_values = space.quick if quick else {}
    q_method, q_attack, q_data, _ = split_keys(quick_values)
    s_method, _, _, _ = split_keys(sets)
    # --set and the quick block pin searched keys (their range is replaced by the value)
    pinned = {k: v for k, v in {**q_method, **s_method}.items() if k in {d.key for d in space.dims}}
    knowledge = knowledge or space.knowledge
    if knowledge not in KNOWLEDGE_LEVELS:
        raise BadInput(f"--knowledge {knowledge!r}: use {' or '.join(KNOWLEDGE_LEVELS)}")
    # a defense's in-method choices follow the level its sweep selects under (DefenseConfig.knowledge)
    level = {"knowledge": knowledge} if "knowledge" in config_fields(space.method) else {}
    if level and s_method.get("knowledge", knowledge) != knowledge:
        raise BadInput(
            f"--set knowledge={s_method['knowledge']}: the sweep selects under knowledge {knowledge}; "
            f"set the level with --knowledge"
        )
    base = resolve_run(
        space.method,
        dataset or space.dataset,
        model or space.model,
        seed,
        attack or space.attack,
        sets=sets,
        base={**space.fixed, **q_method, **level},
        attack_base={**space.attack_values, **q_attack},
        data_base={**space.data_values, **q_data},
        use_preset=use_preset,
        source=source,
        recipe=recipe or space.recipe,
    )
    if base.kind == "attack":
        base.attack_config.update({k: v for k, v in q_attack.items()})
    searcher = searcher or space.searcher
    scheduler = scheduler or space.scheduler
    objective = objective or "single"
    if searcher not in SEARCHERS:
        raise BadInput(f"--searcher {searcher!r}: use one of {', '.join(SEARCHERS)}")
    if scheduler not in SCHEDULERS:
        raise BadInput(f"--scheduler {scheduler!r}: use one of {', '.join(SCHEDULERS)}")
    if objective not in OBJECTIVES:
        raise BadInput(f"--objective {objective!r}: use single or pareto")
    if objective == "pareto" and scheduler == "asha":
        raise BadInput("--objective pareto with --scheduler asha: ASHA is single-objective; use --scheduler fifo")
    plan = SweepPlan(
        space=space,
        base=base,
        searcher=searcher,
        scheduler=scheduler,
        objective=objective,
        num_samples=num_samples if num_samples is not None else space.num_samples,
        max_concurrent=max_concurrent if max_concurrent is not None else space.max_concurrent,
        cpus_per_trial=cpus_per_trial if cpus_per_trial is not None else space.resources.get("cpus_per_trial", 1.0),
        gpus_per_trial=gpus_per_trial if gpus_per_trial is not None else space.resources.get("gpus_per_trial"),
        workers_per_trial=int(
            workers_per_trial if workers_per_trial is not None else space.resources.get("workers_per_trial", 1)
        ),
        pinned=pinned,
        default_trial=default_trial,
        knowledge=knowledge,
    )
    check_knowledge(plan)
    check_canary_objective(plan)
    if plan.num_samples < 1:
        raise BadInput(f"--num-samples {plan.num_samples}: a positive integer")
    if plan.max_concurrent is not None and plan.max_concurrent < 1:
        raise BadInput(f"--max-concurrent {plan.max_concurrent}: a positive integer (leave it out for no limit)")
    gpus = plan.gpus_per_trial
    if plan.cpus_per_trial <= 0 or (gpus is not None and gpus < 0) or plan.workers_per_trial < 1:
        raise BadInput("resources: cpus per trial must be > 0, gpus >= 0, workers >= 1")
    if searcher == "grid":
        bad = [d.key for d in plan.tuned if d.kind not in ("grid", "choice")]
        if bad:
            raise BadInput(
                f"{source}: searcher grid needs grid or choice distributions; "
                f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} continuous"
            )
    validate_space_values(plan)
    return plan


def check_knowledge(plan: SweepPlan) -> None:
    """Under blind knowledge, selecting on a metric that reads the trigger or the poison flags is bad input."""
    if plan.knowledge != BLIND:
        return
    for metric in plan.objective_metrics:
        if knowledge_of(metric) != BLIND:
            what = (
                "the pareto objective"
                if plan.objective == "pareto"
                else "objective.subject_to"
                if metric in plan.constraints
                else "objective.metric"
            )
            raise BadInput(
                f"{plan.space.path}: {what} {metric} needs the trigger or the poison flags (oracle), "
                f"which knowledge blind refuses; blind metrics: {', '.join(blind_metrics())}"
            )


def check_canary_objective(plan: SweepPlan) -> None:
    """The canary ASR is reported only by runs that plant a canary (canary_rate > 0, methods/defenses/shared/canary.py):
    selecting on it without one would fail in every trial, so it is refused before anything starts."""
    if not any(bare_name(m) == "canary_asr" for m in plan.objective_metrics):
        return
    if any(d.key == "canary_rate" for d in plan.tuned) or float(plan.base.config.get("canary_rate") or 0) > 0:
        return
    raise BadInput(
        f"{plan.space.path}: objective.metric {plan.space.metric} is reported only by runs that plant a "
        "canary; set canary_rate > 0 (fixed: {canary_rate: 0.1} in the space, or --set canary_rate=0.1)"
    )


def validate_space_values(plan: SweepPlan) -> None:
    """Build the config at each dimension's extremes (others at the base values) so out-of-range bounds,
    wrong types and cross-field violations fail now, not in trial 37."""
    space, base = plan.space, plan.base
    cls = METHODS.get(space.method).config_cls
    source = str(space.path)
    current = dict(base.config)
    for d in plan.tuned:
        for value in d.samples():
            build_config(cls, apply_derived(space, {**current, d.key: value}), f"{source}: space.{d.key}")
    lows = {d.key: d.samples()[0] for d in plan.tuned if d.samples()}
    highs = {d.key: d.samples()[-1] for d in plan.tuned if d.samples()}
    for corner in (lows, highs):
        build_config(cls, apply_derived(space, {**current, **corner}), f"{source}: space")
    build_config(DataConfig, base.data_config, f"{source}: data")


def tune_param_space(plan: SweepPlan) -> dict[str, Any]:
    """The Ray Tune param_space of the tuned dimensions (fixed and derived values are added in the trial)."""
    from ray import tune

    out: dict[str, Any] = {}
    optuna = plan.searcher == "optuna"
    for d in plan.tuned:
        if d.kind == "choice":
            out[d.key] = tune.grid_search(d.args) if plan.searcher == "grid" else tune.choice(d.args)
        elif d.kind == "grid":
            out[d.key] = tune.choice(d.args) if optuna else tune.grid_search(d.args)
        elif d.kind == "uniform":
            out[d.key] = tune.uniform(*d.args)
        elif d.kind == "loguniform":
            out[d.key] = tune.loguniform(*d.args)
        elif d.kind == "randint":
            out[d.key] = tune.randint(*d.args)
    return out


def trial_values(plan: SweepPlan, sampled: dict[str, Any]) -> dict[str, Any]:
    """The method config of one trial: base values, the sampled ones, then derived keys."""
    values = {**plan.base.config, **{k: v for k, v in sampled.items() if not k.startswith("_")}}
    values = apply_derived(plan.space, values)
    for key, value in list(values.items()):
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{key}: NaN sampled")
    return values


def final_spec(plan: SweepPlan, dataset: str, model: str, defense: str, attack: str, seed: int, chosen: dict[str, Any]):
    """The run of a study cell's configuration (the sweep's base with the chosen values) on one evaluation seed."""
    spec = resolve_run(
        defense,
        dataset,
        model,
        seed,
        attack,
        base={**{k: v for k, v in plan.base.config.items() if k != "seed"}, **chosen},
        attack_base={k: v for k, v in plan.base.attack_config.items() if k != "seed"},
        data_base=plan.base.data_config,
        use_preset=False,
    )
    spec.config = apply_derived(plan.space, spec.config)
    spec.recipe = plan.base.recipe
    return spec
