"""What the orchestrator (Ray Tune + MLflow) costs on top of the methods:

- orchestrator.epoch: one BadNets epoch inside a `bdo tune` trial (Tune's per-iteration time: train, evaluate,
  MLflow metrics, checkpoint, report) against the same epoch as a plain loop over the project's own training
  primitives, with the same number of threads (goal <= 1.05);
- orchestrator.epoch.short: the same on few images, an epoch as short as a GPU's, so that the trial's fixed
  per-epoch costs (report, MLflow, checkpoint) show (goal: under 10% of the epoch, ratio <= 1.10);
- sweep.reuse: an N-trial FT defense sweep (`bdo tune`, attack trained once and cached) against one plain attack
  run plus N plain defense runs divided by the concurrency (goal <= 1.15);
- sweep.naive: the same sweep against a naive one whose every trial retrains the attack (plain Ray Tune, the
  attack and FT run with LocalContext, no MLflow, same concurrency);
- tune.trivial: Ray Tune on its own (with bdo's actor reuse), M trials that sleep and report once, against
  M x sleep / concurrency.

All four share one Ray instance and one pre-migrated MLflow sqlite store, started once for the group (Ray
start-up is reported in the notes, not in any figure). ray and mlflow are imported only in here, lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, BenchContext, Goal, Row, last_line, median, synthetic_train_for

ATTACK = dict(
    dataset="synthetic",
    model="small_cnn",
    batch_size=128,
    lr=0.01,
    poison_rate=0.1,
    label_mode="all2one",
    target=0,
    seed=0,
)
FT_CLEAN_RATIO = 0.2


def _cores() -> int:
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def ray_group(ctx: BenchContext) -> Iterator[None]:
    """Start Ray (as `bdo` does, same runtime env) and a migrated MLflow store once for the group."""
    import ray
    from mlflow.tracking import MlflowClient

    started = time.perf_counter()
    temp = Path(tempfile.mkdtemp(prefix="bdob-", dir="/tmp"))
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0", "PYTHONPATH": str(ROOT)}
    for key in ("BDO_DATA_ROOT", "MLFLOW_TRACKING_URI", "BDO_BENCH_HIDE"):
        if key in os.environ:
            env[key] = os.environ[key]
    ray.init(
        num_cpus=_cores(),
        num_gpus=1 if ctx.device == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=ctx.verbose,
        _temp_dir=str(temp),
        object_store_memory=300 * 2**20,
        runtime_env={"env_vars": env},
    )
    ctx.shared["ray_start_s"] = time.perf_counter() - started
    store = ctx.scratch / "mlflow.db"
    started = time.perf_counter()
    uri = f"sqlite:///{store}"
    MlflowClient(uri).search_experiments()
    ctx.shared["mlflow_store_s"] = time.perf_counter() - started
    ctx.shared["tracking_uri"] = uri
    ctx.log(f"ray up in {ctx.shared['ray_start_s']:.1f} s, mlflow store in {ctx.shared['mlflow_store_s']:.1f} s")
    try:
        yield
    finally:
        ray.shutdown()


def _bdo(ctx: BenchContext, args: list[str]) -> None:
    from orchestrator.cli import main

    code = main(args + ["--tracking-uri", ctx.shared["tracking_uri"], "--no-preset"])
    if code != 0:
        raise RuntimeError(f"bdo {' '.join(args[:2])} exited {code}")


def _space(ctx: BenchContext, name: str, content: dict[str, Any]) -> Path:
    import yaml

    path = ctx.scratch / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def _data(images: int, test_images: int) -> dict[str, int]:
    return {"synthetic_train": synthetic_train_for(images), "synthetic_test": max(100, test_images)}


# ---------------------------------------------------------------------------------------- epoch overhead
def plain_epochs(ctx: BenchContext, attack_values: dict[str, Any], data_values: dict[str, int]) -> list[float]:
    """The BadNets recipe as a plain loop over the project's primitives: per epoch train_epoch, the scheduler
    step, the val/test ACC/ASR/RA evaluation and the loss read-back; seconds per epoch."""
    import torch

    import methods  # noqa: F401
    from methods.attacks.badnets import make_badnets_trigger
    from methods.attacks.base import build_poisoned_data, evaluate
    from methods.core.method import get_method
    from methods.core.training import make_generator, sgd, train_epoch
    from methods.data.augment import standard_augment
    from methods.data.base import DataConfig, load_splits
    from methods.models.base import build_model

    device = ctx.torch_device()
    cfg = get_method("badnets").make_config(attack_values)
    seeds = cfg.seeds()
    splits = load_splits(cfg.dataset, seeds["split_seed"], cfg=DataConfig(**data_values))
    trigger = make_badnets_trigger(splits.info, cfg, seeds["poison_seed"])
    data = build_poisoned_data(splits, cfg, trigger, seeds["poison_seed"]).to(device)
    torch.manual_seed(seeds["train_seed"])
    model = build_model(cfg.model, data.info).to(device)
    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    g = make_generator(seeds["train_seed"], device)
    augment = lambda xb: standard_augment(xb, data.info, g)  # noqa: E731
    times = []
    for _ in range(cfg.epochs):
        started = time.perf_counter()
        loss = train_epoch(model, optimizer, data.x_train, data.y_train, cfg.batch_size, g, augment)
        scheduler.step()
        evaluate(model, data, batch_size=cfg.eval_batch_size)
        loss.item()
        times.append(time.perf_counter() - started)
    return times


def _iteration_times(tune_root: Path) -> list[float]:
    """time_this_iter_s of every iteration after the first, from the trial's result.json."""
    files = sorted(tune_root.glob("*/*/result.json"))
    if not files:
        raise RuntimeError(f"no Tune result.json under {tune_root}")
    rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["training_iteration"])
    return [float(r["time_this_iter_s"]) for r in rows if r["training_iteration"] >= 2]


def bench_epoch(ctx: BenchContext, short: bool = False) -> list[Row]:
    """orchestrator.epoch, or with `short` its variant on few images: an epoch as short as a GPU's (a ResNet-18
    epoch of CIFAR-10 takes 2-3 s there), where every fixed per-epoch cost of the trial shows in the ratio."""
    import torch

    sizes = ctx.sizes
    cores = _cores()
    name = "orchestrator.epoch.short" if short else "orchestrator.epoch"
    images = sizes.short_epoch_images if short else sizes.orch_images
    epochs = max(3, sizes.short_epoch_epochs if short else sizes.orch_epochs)
    attack = {**ATTACK, "epochs": epochs}
    data = _data(images, sizes.test_images)
    torch.set_num_threads(cores)
    ctx.log(f"{name}: plain loop, {epochs} epochs on {images} images")
    plain = [plain_epochs(ctx, attack, data)]
    storage = ctx.scratch / f"{name}-storage"
    space = _space(
        ctx,
        name,
        {
            "method": "badnets",
            "dataset": "synthetic",
            "model": "small_cnn",
            "data": data,
            "fixed": {k: v for k, v in attack.items() if k not in ("dataset", "model")},
            "objective": {"metric": "val_acc", "mode": "max"},
            "num_samples": 1,
        },
    )
    ctx.probe.reset()
    ctx.log(f"{name}: one bdo tune trial")
    started = time.perf_counter()
    with ctx.probe.tree():
        _bdo(
            ctx,
            [
                "tune",
                str(space),
                "--num-samples",
                "1",
                "--cpus-per-trial",
                str(cores),
                "--storage",
                str(storage),
                "--experiment",
                f"bench-{name}",
                "--gpus-per-trial",
                "1" if ctx.device == "cuda" else "0",
            ],
        )
    trial_wall = time.perf_counter() - started
    row = ctx.probe.fill(
        Row(
            name=name,
            unit="s/epoch",
            baseline_unit="s/epoch",
            # the short epoch's goal: the trial's fixed per-epoch costs under 10% of the epoch
            goal=Goal("ratio", "<=", 1.10 if short else 1.05),
            what=f"BadNets epoch in a bdo tune trial vs the same epoch as a plain loop, small_cnn, "
            f"{images} images, {cores} threads",
        )
    )
    trial = _iteration_times(storage / "tune")
    if not ctx.quick:
        ctx.log(f"{name}: plain loop again")
        plain.append(plain_epochs(ctx, attack, data))
    plain_medians = [median(p[1:]) for p in plain]
    row.measured = median(trial)
    row.baseline = sum(plain_medians) / len(plain_medians)
    row.note = (
        f"medians over epochs 2..{epochs} (epoch 1 holds the trial start-up); plain loop measured "
        f"{'before and after' if len(plain) > 1 else 'before'} the trial; whole trial incl. start-up and "
        f"sweep bookkeeping {trial_wall:.1f} s; peak host includes Ray's daemons"
    )
    row.details = {
        "trial_epoch_s": trial,
        "plain_epoch_s": plain,
        "trial_wall_s": trial_wall,
        "ray_start_s": ctx.shared.get("ray_start_s"),
    }
    return [row]


# ------------------------------------------------------------------------------------------------- sweeps
def naive_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """A trial of the naive sweep: train the attack, then run FT on it, both in-process without tracking."""
    import torch
    from ray import tune

    device = "cuda" if spec["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    metrics = _attack_then_defense({**spec, "device": device}, float(config["lr"]))
    tune.report({"val_der": metrics.get("val_der", 0.0)})


def _attack_then_defense(spec: dict[str, Any], lr: float) -> dict[str, float]:
    import torch

    import methods  # noqa: F401
    from methods.core.context import LocalContext
    from methods.core.method import get_method
    from methods.data.base import DataConfig

    device = torch.device(spec["device"])
    data_cfg = DataConfig(**spec["data"])
    attack = get_method("badnets")
    backdoor = attack.run(LocalContext(device=device, data_config=data_cfg), attack.make_config(spec["attack"]))
    defense = get_method("ft")
    result = defense.run(
        LocalContext(device=device, data_config=data_cfg, backdoor_provider=lambda: backdoor),
        defense.make_config({**spec["defense"], "lr": lr}),
    )
    return result.metrics


def bench_sweep(ctx: BenchContext) -> list[Row]:
    import torch
    from ray import tune

    import methods  # noqa: F401
    from methods.core.context import LocalContext
    from methods.core.method import get_method
    from methods.data.base import DataConfig

    sizes = ctx.sizes
    cores = _cores()
    n, concurrency = sizes.sweep_trials, sizes.sweep_concurrency
    cpus_per_trial = max(1, cores // concurrency)
    concurrency = min(concurrency, max(1, cores // cpus_per_trial))
    attack = {**ATTACK, "epochs": sizes.sweep_attack_epochs}
    defense = {"epochs": sizes.sweep_defense_epochs, "clean_ratio": FT_CLEAN_RATIO}
    data = _data(sizes.orch_images, sizes.test_images)
    data_cfg = DataConfig(**data)
    reps = 1 if ctx.quick else 2

    # the parts, as plain runs: the attack with the driver's threads, FT with one trial's threads
    torch.set_num_threads(cores)
    ctx.log("sweep: plain attack run")
    started = time.perf_counter()
    device = ctx.torch_device()
    gpus_per_trial = 1.0 / concurrency if ctx.device == "cuda" else 0.0
    spec = get_method("badnets")
    backdoor = spec.run(LocalContext(device=device, data_config=data_cfg), spec.make_config(attack))
    attack_s = time.perf_counter() - started
    torch.set_num_threads(cpus_per_trial)
    ft = get_method("ft")
    defense_runs = []
    for _ in range(reps):
        ctx.log("sweep: plain FT run")
        started = time.perf_counter()
        ft.run(
            LocalContext(device=device, data_config=data_cfg, backdoor_provider=lambda: backdoor),
            ft.make_config(defense),
        )
        defense_runs.append(time.perf_counter() - started)
    defense_s = median(defense_runs)
    torch.set_num_threads(cores)
    ideal = attack_s + n * defense_s / concurrency

    space = _space(
        ctx,
        "sweep",
        {
            "method": "ft",
            "dataset": "synthetic",
            "model": "small_cnn",
            "attack": {"name": "badnets", **{k: v for k, v in attack.items() if k not in ("dataset", "model")}},
            "data": data,
            "fixed": defense,
            "space": {"lr": {"loguniform": [0.001, 0.05]}},
            "objective": {"metric": "val_der", "mode": "max"},
            "num_samples": n,
        },
    )
    ctx.probe.reset()
    ctx.log(f"sweep: bdo tune, {n} FT trials, concurrency {concurrency}")
    started = time.perf_counter()
    with ctx.probe.tree():
        _bdo(
            ctx,
            [
                "tune",
                str(space),
                "--num-samples",
                str(n),
                "--max-concurrent",
                str(concurrency),
                "--cpus-per-trial",
                str(cpus_per_trial),
                "--storage",
                str(ctx.scratch / "sweep-storage"),
                "--experiment",
                "bench-sweep",
                "--seed",
                "0",
                "--gpus-per-trial",
                f"{gpus_per_trial:g}",
            ],
        )
    sweep_s = time.perf_counter() - started
    sweep_host, sweep_gpu = ctx.probe.host_mb(), ctx.probe.gpu_mb()

    ctx.probe.reset()
    ctx.log(f"sweep: naive sweep, {n} trials each retraining the attack")
    naive_spec = {"attack": attack, "defense": defense, "data": data, "device": ctx.device}
    naive_resources = {"CPU": cpus_per_trial, **({"GPU": gpus_per_trial} if gpus_per_trial else {})}
    naive_error = ""
    started = time.perf_counter()
    try:
        with ctx.probe.tree():
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(naive_trial, spec=naive_spec), naive_resources),
                param_space={"lr": tune.loguniform(0.001, 0.05)},
                tune_config=tune.TuneConfig(num_samples=n, max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name="naive", storage_path=str(ctx.scratch / "naive-storage"), verbose=0),
            )
            grid = tuner.fit()
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            naive_error = f"naive sweep: {len(errors)} trial(s) failed: {last_line(errors[0])}"
    except Exception as exc:  # the reuse row stands on its own
        naive_error = f"naive sweep: {type(exc).__name__}: {last_line(exc)}"
    naive_s = time.perf_counter() - started
    naive_host = ctx.probe.host_mb()

    per_trial = (sweep_s - ideal) * concurrency / n
    common = (
        f"N={n} FT trials ({defense['epochs']} epochs on {FT_CLEAN_RATIO:.0%} clean data), concurrency {concurrency}"
    )
    reuse = Row(
        name="sweep.reuse",
        measured=sweep_s,
        baseline=ideal,
        unit="s",
        baseline_unit="s",
        goal=Goal("ratio", "<=", 1.15),
        peak_host_mb=sweep_host,
        peak_gpu_mb=sweep_gpu,
        what=f"bdo tune defense sweep vs one attack + N defense runs / concurrency; {common}",
    )
    reuse.note = (
        f"plain attack {attack_s:.1f} s ({attack['epochs']} epochs, {sizes.orch_images} images, {cores} "
        f"threads), plain FT run {defense_s:.1f} s ({cpus_per_trial} thread); orchestration costs "
        f"{per_trial:+.1f} s of trial-slot time per trial; peak host includes Ray's daemons"
    )
    expected = ideal / (n * (attack_s * cores / cpus_per_trial + defense_s) / concurrency)
    naive = Row(
        name="sweep.naive",
        measured=sweep_s,
        baseline=naive_s,
        unit="s",
        baseline_unit="s",
        peak_host_mb=sweep_host,
        peak_gpu_mb=sweep_gpu,
        what=f"the same sweep vs a naive sweep that retrains the attack in every trial; {common}",
    )
    naive.note = f"naive sweep {naive_s:.1f} s, peak host {naive_host:,.0f} MB"
    if ctx.device == "cpu":
        naive.note += f"; if the attack scaled linearly with threads the ideal ratio would be ~{expected:.2f}"
    details = {
        "attack_s": attack_s,
        "defense_s": defense_runs,
        "sweep_s": sweep_s,
        "naive_s": naive_s,
        "trials": n,
        "concurrency": concurrency,
        "cpus_per_trial": cpus_per_trial,
        "naive_peak_host_mb": naive_host,
    }
    reuse.details = naive.details = details
    if naive_error:
        naive = Row(name="sweep.naive", status="error", note=naive_error[:400], details=details)
    return [reuse, naive]


def sleeper(config: dict[str, Any]) -> None:
    """A trial that does nothing but wait: what is left of its wall time is Tune's own cost."""
    from ray import tune

    time.sleep(config["seconds"])
    tune.report({"done": 1.0})


def bench_trivial(ctx: BenchContext) -> list[Row]:
    from ray import tune

    sizes = ctx.sizes
    concurrency = _cores()
    m, seconds = sizes.trivial_trials, sizes.trivial_seconds
    ideal = m * seconds / concurrency
    ctx.probe.reset()
    ctx.log(f"tune.trivial: {m} trials of {seconds:g} s, concurrency {concurrency}")
    started = time.perf_counter()
    with ctx.probe.tree():
        tuner = tune.Tuner(
            tune.with_resources(sleeper, {"CPU": 1}),
            param_space={"seconds": seconds, "index": tune.grid_search(list(range(m)))},
            # as bdo runs its sweeps: a trial's actor is reused by the next one instead of starting a process
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name="trivial", storage_path=str(ctx.scratch / "trivial-storage"), verbose=0),
        )
        grid = tuner.fit()
    wall = time.perf_counter() - started
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        return [Row(name="tune.trivial", status="error", note=f"{len(errors)} trial(s) failed: {last_line(errors[0])}")]
    row = ctx.probe.fill(
        Row(
            name="tune.trivial",
            measured=wall,
            baseline=ideal,
            unit="s",
            baseline_unit="s",
            what=f"Ray Tune alone (actors reused, as bdo sweeps run): {m} trials that sleep {seconds:g} s and report "
            f"once vs {m} x sleep / {concurrency}",
        )
    )
    per_trial = (wall - ideal) * concurrency / m
    row.note = f"Tune costs {per_trial:+.2f} s of trial-slot time per trial; peak host includes Ray's daemons"
    row.details = {"trials": m, "seconds": seconds, "concurrency": concurrency, "wall_s": wall}
    return [row]
