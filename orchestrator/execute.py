"""Running one resolved method run (attack or defense) with a context, and logging what it leaves behind.

Used alike by `bdo attack`/`bdo defend` in-process, by Tune trials and by Ray Train workers, so every path runs
the same methods/ code and produces the same MLflow artifacts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from methods.core.method import METHODS
from orchestrator import plots
from orchestrator.console import ProgressPrinter
from orchestrator.context import Reporter, TrackedContext, write_parquet_atomic
from orchestrator.devices import pick_device
from orchestrator.resolve import RunSpec
from orchestrator.resumable import resumable_run
from orchestrator.tracking import DatasetRecord, Tracker, system_metrics_interval

# torch (and the attack cache, which holds Backdoors) is imported in the functions that run or log a method: the
# CLI imports this module (through runner) to validate input, which must not cost torch's import
if TYPE_CHECKING:  # pragma: no cover
    import torch

    from methods.attacks.base import Backdoor
    from methods.defenses.shared.common import DefenseResult
    from orchestrator.session import Session


def base_tags(spec: RunSpec, role: str, seeds: dict[str, int]) -> dict[str, str]:
    tags = {"role": role, "method": spec.method, "attack": spec.attack, "dataset": spec.dataset, "model": spec.model}
    tags.update({k: str(v) for k, v in seeds.items()})
    if spec.presets:
        tags["preset"] = ",".join(spec.presets)
    return tags


def attack_seeds(spec: RunSpec) -> dict[str, int]:
    return spec.attack_cfg().seeds()


def fault_hook(spec: str | None, trial_index: int | None) -> Any:
    """BDO_FAULT (read on the driver, shipped to trials) injects failures for fault-tolerance tests and drills:
    `raise:step=2[:trial=0]` raises after that step's report, `kill:step=2[:trial=0][:once=/path]` SIGKILLs the
    process (once: only if the marker file does not exist yet, creating it), `wait:step=2[:trial=0]:until=/path`
    holds the trial there until that file exists (a trial that is surely mid-run when a test kills something)."""
    if not spec:
        return None
    parts = dict(p.split("=", 1) for p in spec.split(":")[1:] if "=" in p)
    action, step = spec.split(":")[0], int(parts.get("step", "1"))
    if "trial" in parts and trial_index is not None and int(parts["trial"]) != trial_index:
        return None
    if action == "wait" and "until" not in parts:
        raise ValueError(f"BDO_FAULT={spec!r}: wait needs until=/path, the file that releases the trial")

    def hook(reported_step: int, metrics: dict[str, float]) -> None:
        if reported_step != step:
            return
        marker = parts.get("once")
        if marker:
            if Path(marker).exists():
                return
            Path(marker).write_text("fired")
        if action == "wait":
            release = Path(parts["until"])
            while not release.exists():
                time.sleep(0.2)
            return
        if action == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"BDO_FAULT injected failure at step {step}")

    return hook


def reset_global_rngs(seed: int) -> None:
    """Start every run from the same global random state, derived from its seed. A trial may run in a reused
    actor, after other trials or beside them in the same process; anything a method draws from the global
    generators (a new head's initial weights) must not depend on what ran there before."""
    import random

    import torch

    from methods.core.training import derive_seed

    value = derive_seed(int(seed), "global")
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def run_method(spec: RunSpec, ctx: TrackedContext) -> Backdoor | DefenseResult:
    import torch

    method = METHODS.get(spec.method)
    cfg = spec.method_config()
    reset_global_rngs(spec.config.get("seed", 0) or 0)
    if not ctx.logs:
        result = method.run(ctx, cfg)
        ctx.flush()
        return result
    # which chip and which fast switches produced this run's numbers
    # (the thread count too: float sums in another order can differ in the last bits between machines)
    ctx.tracker.set_tags(
        ctx.run_id,
        {
            "device": ctx.device.type,
            "torch_threads": torch.get_num_threads(),
            "fast_path": json.dumps(ctx.fast.resolved(ctx.device), sort_keys=True),
        },
    )
    with ctx.tracker.system_metrics(ctx.run_id, ctx.system_metrics):
        result = method.run(ctx, cfg)
        ctx.flush()
    return result


def _digest(*tensors: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def dataset_records(spec: RunSpec, backdoor: Backdoor) -> list[DatasetRecord]:
    """The splits a run trained and was measured on, named so the runs table tells a poisoned training set from
    the clean one and runs can be filtered by dataset; the digest changes whenever the images or labels do."""
    data, seeds = backdoor.data, backdoor.seeds
    poisoned = int(data.poison_flags.sum())
    source = {"dataset": spec.dataset, "split_seed": seeds.get("split_seed"), "data": spec.data_config}
    train_name = f"{spec.dataset}-train" + (f"-{backdoor.attack}" if poisoned else "")
    return [
        DatasetRecord(
            train_name,
            _digest(data.x_train, data.y_train),
            "training",
            {**source, "attack": backdoor.attack, "poison_seed": seeds.get("poison_seed")},
            {"num_rows": len(data.y_train), "poison_count": poisoned},
        ),
        DatasetRecord(
            f"{spec.dataset}-val", _digest(data.x_val, data.y_val), "validation", source, {"num_rows": len(data.y_val)}
        ),
        DatasetRecord(
            f"{spec.dataset}-test", _digest(data.x_test, data.y_test), "test", source, {"num_rows": len(data.y_test)}
        ),
    ]


def final_model(spec: RunSpec, model_state: dict, backdoor: Backdoor) -> torch.nn.Module:
    from methods.models.base import build_model

    model = build_model(spec.model, backdoor.data.info)
    model.load_state_dict(model_state)
    return model.eval()


def log_mlflow_model(tracker: Tracker, run_id: str, model: torch.nn.Module, backdoor: Backdoor) -> None:
    from methods.core.training import to_float

    example = to_float(backdoor.data.x_val[:2].cpu()).numpy()
    tracker.log_pytorch_model(run_id, model.cpu().eval(), example)


def confusion_matrices(model: torch.nn.Module, backdoor: Backdoor, device: torch.device) -> dict[str, np.ndarray]:
    """Test-split confusion matrices of the final model: on clean images, and on triggered images against their
    true classes (the attack's target column shows the backdoor; all2all needs the whole matrix)."""
    import torch

    from methods.core.training import predict_logits

    data = backdoor.data
    n = data.num_classes
    model = model.to(device)
    x_trig, _, y_true = data.backdoor_set("test")

    def matrix(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        pred = predict_logits(model, x.to(device)).argmax(1).cpu()
        return torch.bincount(y.cpu() * n + pred, minlength=n * n).reshape(n, n).numpy()

    return {
        "clean test images": matrix(data.x_test, data.y_test),
        "triggered test images (true class)": matrix(x_trig, y_true),
    }


def _samples(data, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Validation images next to the same images with the evaluation trigger."""
    clean = data.x_val[:n].cpu()
    return clean.numpy(), data.trigger.apply(clean, test=True).numpy()


def log_outputs(
    tracker: Tracker,
    run_id: str,
    spec: RunSpec,
    ctx: TrackedContext,
    model_state: dict,
    backdoor: Backdoor,
    seeds: dict[str, int],
) -> None:
    """config.yaml, model/, trigger.png, samples.png, scores.parquet and plots/ for one run."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="bdo-artifacts-") as tmp:
        d = Path(tmp)
        resolved = {
            "method": spec.method,
            "kind": spec.kind,
            "config": spec.config,
            "attack": spec.attack,
            "attack_config": spec.attack_config,
            "data": spec.data_config,
            "seeds": seeds,
            "presets": spec.presets,
        }
        (d / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=True))
        model_dir = d / "model"
        model_dir.mkdir()
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(model_dir / "model.safetensors"))
        (model_dir / "model.json").write_text(
            json.dumps(
                {
                    "model": spec.model,
                    "dataset": spec.dataset,
                    "info": backdoor.data.info.__dict__,
                    "format": "safetensors state_dict; load with methods.models.base.build_model",
                },
                indent=1,
            )
        )
        data = backdoor.data
        plots.trigger_png(d / "trigger.png", data.trigger.preview_pattern().numpy())
        clean, poisoned = _samples(data)
        plots.samples_png(d / "samples.png", clean, poisoned)
        if "scores" in ctx.tables:
            write_parquet_atomic(d / "scores.parquet", ctx.tables["scores"])
        plot_dir = d / "plots"
        plot_dir.mkdir()
        plots.curves_png(plot_dir / "curves.png", ctx.history, f"{spec.method} on {spec.attack} / {spec.dataset}")
        plots.draw_handoffs(plot_dir, ctx.tables, ctx.series, spec.method)
        model = final_model(spec, model_state, backdoor)
        plots.confusion_png(plot_dir / "confusion.png", confusion_matrices(model, backdoor, ctx.device))
        for item in sorted(d.iterdir()):
            tracker.log_artifact(run_id, item, None if item.is_file() else item.name)
    tracker.log_datasets(run_id, dataset_records(spec, backdoor))
    log_mlflow_model(tracker, run_id, model, backdoor)


def build_attack(
    spec: RunSpec,
    tracker: Tracker,
    storage: Path,
    data_root: Path,
    download: bool,
    extra_tags: dict[str, str] | None = None,
    device: torch.device | None = None,
    on_report=None,
) -> tuple[Backdoor, str, str]:
    """The backdoored model of `spec`'s attack, from the cache or trained now (once per content hash, with
    its own top-level MLflow run, role=attack). Returns (backdoor, attack_run_id, cache key).

    The same config trains a different model on a CPU than on a GPU, and under another fast path (other random
    streams, bf16), so the device type and the resolved fast switches are part of the key and recorded in the
    entry: a GPU sweep never silently reuses a CPU-built model, nor the other way round."""
    import torch

    from orchestrator.cache import AttackCache, cache_key

    attack_spec = RunSpec(
        spec.attack,
        "attack",
        spec.attack_config,
        spec.attack,
        spec.attack_config,
        spec.data_config,
        [p for p in spec.presets if f"/{spec.attack}.yaml" in p],
        spec.recipe,
        spec.fast_config,
    )
    device = device or pick_device()
    built_with = {"device": device.type, "fast": attack_spec.fast_cfg().resolved(device)}
    key = cache_key(spec.attack, spec.attack_config, spec.data_config, built_with)
    cache = AttackCache(storage)

    def build() -> tuple[Backdoor, dict]:
        from orchestrator.resumable import resumable_run

        seeds = attack_seeds(attack_spec)
        tags = {**base_tags(attack_spec, "attack", seeds), "attack_cache_key": key, **(extra_tags or {})}
        # a build killed mid-training left its checkpoint under this key: the next build continues it
        with resumable_run(
            tracker, storage, "attack", key, f"attack-{spec.attack}", tags, attack_spec.flat_params()
        ) as (run_id, reporter, history):
            ctx = TrackedContext(
                device=device,
                run_id=run_id,
                tracker=tracker,
                reporter=reporter,
                data_root=data_root,
                download=download,
                data_config=attack_spec.data_cfg(),
                fast=attack_spec.fast_cfg(),
                on_report=on_report,
                system_metrics=system_metrics_interval(),
                history=history,
            )
            with tracker.ending(run_id):
                backdoor = run_method(attack_spec, ctx)
                log_outputs(tracker, run_id, attack_spec, ctx, backdoor.model_state, backdoor, seeds)
        return backdoor.to(torch.device("cpu")), {"attack_run_id": run_id, "built_with": built_with}

    backdoor, meta, built = cache.get_or_build(key, build)
    run_id = meta.get("attack_run_id", "")
    if not built and not tracker.has_run(run_id):
        run_id = restore_attack_run(tracker, attack_spec, backdoor, key, run_id, extra_tags)
    return backdoor, run_id, key


def attack_of_run(tracker: Tracker, run_id: str, storage: Path) -> tuple[Backdoor, str]:
    """The backdoored model and poisoned data of attack run `run_id`: the attack cache entry named by its
    `attack_cache_key` tag, used only if its weights are the run's own (model/model.safetensors, compared by
    digest). Anything else is bad input, so a defense never runs under an attack id it did not use."""
    from safetensors.torch import load_file

    from orchestrator.cache import AttackCache
    from orchestrator.errors import BadInput

    run = tracker.client.get_run(run_id)
    key = run.data.tags.get("attack_cache_key", "")
    backdoor = AttackCache(storage).load(key) if key else None
    where = f"--attack-run {run_id}"
    if backdoor is None:
        raise BadInput(
            f"{where}: its attack is not in the attack cache at {storage} (key {key or 'unrecorded'}); pass "
            "the --storage it was built with, or use --attack NAME to train one"
        )
    with tempfile.TemporaryDirectory() as d:
        try:
            path = tracker.client.download_artifacts(run_id, "model/model.safetensors", d)
        except Exception:
            raise BadInput(
                f"{where}: the run has no model/model.safetensors artifact to check the cache against"
            ) from None
        logged = weights_digest(load_file(path))
    if logged != weights_digest(backdoor.model_state):
        raise BadInput(
            f"{where}: the cache entry {key} holds other weights than the run logged; it was rebuilt "
            "since, so that run's model is gone"
        )
    return backdoor, key


def restore_attack_run(
    tracker: Tracker, spec: RunSpec, backdoor: Backdoor, key: str, built_by: str, extra_tags: dict[str, str] | None
) -> str:
    """The cache served an attack that this tracking store has never seen (a new store over shared storage):
    record it here as an attack run, so every defense built on it names a run this store can open, and the
    report's no-defense column has its metrics. Tagged as restored, with the run that trained it elsewhere."""
    import torch

    seeds = backdoor.seeds
    run_id = tracker.start_run(
        f"attack-{spec.method}",
        {
            **base_tags(spec, "attack", seeds),
            "attack_cache_key": key,
            "restored_from_cache": "true",
            "cache_built_by_run": built_by or "unknown",
            **(extra_tags or {}),
        },
    )
    tracker.log_params(run_id, spec.flat_params())
    tracker.log_metrics(run_id, backdoor.metrics, int(spec.attack_config.get("epochs", 0)))
    ctx = TrackedContext(
        device=torch.device("cpu"),
        run_id=run_id,
        tracker=tracker,
        reporter=Reporter(),
        history=[(int(spec.attack_config.get("epochs", 0)), dict(backdoor.metrics))],
    )
    log_outputs(tracker, run_id, spec, ctx, backdoor.model_state, backdoor, seeds)
    tracker.end(run_id, "FINISHED")
    return run_id


def execute_defense(
    spec: RunSpec, ctx: TrackedContext, tracker: Tracker | None, run_id: str | None, backdoor: Backdoor
) -> tuple[dict[str, float], dict]:
    """Run a defense with its context and log its outputs (rank 0). Returns (final metrics, final weights)."""
    result = run_method(spec, ctx)
    if ctx.logs:
        # the result's metrics that no report carried (the test split's blind signals, measured only for the
        # returned model: methods.defenses.shared.common.final_result), logged with the last report, which describes it
        reported = {k for _, metrics in ctx.history for k in metrics}
        unreported = {k: v for k, v in result.metrics.items() if k not in reported}
        if unreported:
            # at the last report's step; a resumed run that had nothing left to train reported none: its checkpoint's
            tracker.log_metrics(run_id, unreported, ctx.history[-1][0] if ctx.history else ctx.resumed_at)
        log_outputs(tracker, run_id, spec, ctx, result.model_state, backdoor, backdoor.seeds)
    return result.metrics, result.model_state


def execute_attack(
    spec: RunSpec, ctx: TrackedContext, tracker: Tracker | None, run_id: str | None
) -> tuple[dict[str, float], dict]:
    backdoor = run_method(spec, ctx)
    if ctx.logs:
        log_outputs(tracker, run_id, spec, ctx, backdoor.model_state, backdoor, backdoor.seeds)
    return backdoor.metrics, backdoor.model_state


def weights_digest(state: dict) -> str:
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_single(
    session: Session,
    spec: RunSpec,
    extra_tags: dict[str, str] | None = None,
    given_attack: tuple | None = None,
    role: str | None = None,
    parent_id: str | None = None,
    device=None,
) -> tuple[str, dict[str, float]]:
    """`bdo attack` / `bdo defend`: one top-level run, trained in this process (on `device`, else the default)."""
    tracker = session.open_tracker()
    device = device or pick_device()
    progress = ProgressPrinter(spec.method, fault_hook(os.environ.get("BDO_FAULT"), None))
    if spec.kind == "attack":
        # through the attack cache, so a `bdo defend --attack` with the same settings reuses this model
        backdoor, run_id, key = build_attack(
            spec,
            tracker,
            session.storage,
            session.data_root,
            session.download,
            extra_tags=extra_tags,
            device=device,
            on_report=progress,
        )
        if progress.steps == 0:  # nothing trained: the same settings were built before
            print(f"{spec.method}: the same attack is in the cache ({key}); its run is {run_id}")
        return run_id, backdoor.metrics
    if given_attack is not None:  # --attack-run: exactly that run's model (checked by attack_of_run)
        backdoor, key, attack_id = given_attack
    else:
        backdoor, attack_id, key = build_attack(
            spec,
            tracker,
            session.storage,
            session.data_root,
            session.download,
            device=device,
            on_report=ProgressPrinter(f"{spec.attack} (attack)"),
        )
    seeds = backdoor.seeds
    tags = {
        **base_tags(spec, role or "defense", seeds),
        "attack_run_id": attack_id,
        "attack_cache_key": key,
        **(extra_tags or {}),
    }
    from orchestrator.cache import cache_key

    # everything that decides the defense's weights: a run killed mid-training is continued by the same command
    run_key = cache_key(
        spec.method,
        spec.config,
        {"data": spec.data_config, "attack_cache_key": key},
        {"device": device.type, "fast": spec.fast_cfg().resolved(device)},
    )
    with resumable_run(
        tracker,
        session.storage,
        "defense",
        run_key,
        f"{spec.method}-on-{spec.attack}",
        tags,
        spec.flat_params(),
        parent_id,
    ) as (run_id, reporter, history):
        ctx = TrackedContext(
            device=device,
            run_id=run_id,
            tracker=tracker,
            reporter=reporter,
            backdoor_obj=backdoor.to(device),
            data_root=session.data_root,
            download=session.download,
            data_config=spec.data_cfg(),
            fast=spec.fast_cfg(),
            on_report=progress,
            system_metrics=system_metrics_interval(),
            history=history,
        )
        with tracker.ending(run_id):
            metrics, _ = execute_defense(spec, ctx, tracker, run_id, ctx.backdoor_obj)
    return run_id, metrics
