"""Training throughput of the attack method (BadNets through `get_method("badnets").run`) against a conventional
per-image DataLoader pipeline of the same model, the fast path (methods.core.fastpath) on against off, and
several training processes sharing one device against one process.

What is timed is the method's own training epochs: `train_epoch` as the training engine calls it
(methods.core.engine, whose epoch stage trains every attack) is wrapped by a timer for the duration of the run
(the per-epoch evaluation and checkpoint the method does are not training and are reported separately as
end-to-end throughput). The first `warmup_epochs` epochs are not counted; the figure is the median over the
remaining epochs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, BenchContext, Goal, Row, median, synchronize, synthetic_train_for

ATTACK = dict(
    dataset="synthetic",
    batch_size=128,
    lr=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    poison_rate=0.1,
    label_mode="all2one",
    target=0,
    seed=0,
    augment=True,
)
# img/s on one H200 with the fast path, at the methods' batch size and at a larger one (where launch overhead no
# longer binds); the fast path should also give >= 1.5x the path off (the row's ratio).
FAST_GOALS = {("resnet18", 128): 40_000.0, ("resnet18", 512): 60_000.0}
FAST_RATIO_GOAL = 1.5


def attack_config(model: str, epochs: int, eval_batch_size: int = 1024, batch_size: int = 128):
    import methods  # noqa: F401  (registers everything)
    from methods.core.method import get_method

    return get_method("badnets").make_config(
        {**ATTACK, "model": model, "epochs": epochs, "eval_batch_size": eval_batch_size, "batch_size": batch_size}
    )


def data_config(train_images: int, test_images: int):
    from methods.data.base import DataConfig

    return DataConfig(synthetic_train=synthetic_train_for(train_images), synthetic_test=max(100, test_images))


@contextlib.contextmanager
def timed_epochs(device: Any, on_epoch_end: Callable[[int], None] | None = None) -> Iterator[list[tuple[float, float]]]:
    """Time every training epoch of the attack methods: yields a list that fills with (start, end) wall-clock
    pairs (time.time, comparable across processes), synchronised with the device at both ends."""
    import methods.core.engine as engine  # the attacks train through engine.epochs

    original = engine.train_epoch
    spans: list[tuple[float, float]] = []

    def timed(*args, **kwargs):
        synchronize(device)
        started = time.time()
        out = original(*args, **kwargs)
        synchronize(device)
        spans.append((started, time.time()))
        if on_epoch_end is not None:
            on_epoch_end(len(spans))
        return out

    engine.train_epoch = timed
    try:
        yield spans
    finally:
        engine.train_epoch = original


def run_method(
    ctx: BenchContext,
    model: str,
    train_images: int,
    fast: bool = False,
    on_epoch_end: Callable[[int], None] | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Train the BadNets method once; returns the median training img/s over the measured epochs."""
    import torch

    from methods.core.context import LocalContext
    from methods.core.fastpath import FastPath
    from methods.core.method import get_method

    sizes = ctx.sizes
    device = ctx.torch_device()
    epochs = epochs or sizes.warmup_epochs + sizes.measured_epochs
    cfg = attack_config(model, epochs, eval_batch_size=4096 if ctx.device == "cuda" else 1024, batch_size=batch_size)
    # The fast path is the methods' own (methods.core.fastpath), forced on or off so both rows mean the same on
    # every device (its defaults would switch it on for CUDA only).
    speed = FastPath(
        bf16=fast,
        channels_last=fast,
        cudnn_benchmark=fast,
        compile=fast and bool(ctx.compile),
        compile_mode=ctx.compile or "default",
    )
    local = LocalContext(device=device, data_config=data_config(train_images, sizes.test_images), fast=speed)
    torch.manual_seed(0)
    started = time.perf_counter()
    with timed_epochs(device, on_epoch_end) as spans:
        backdoor = get_method("badnets").run(local, cfg)
    wall = time.perf_counter() - started
    durations = [end - start for start, end in spans]
    measured = durations[sizes.warmup_epochs :] or durations
    n = len(backdoor.data.y_train)
    return {
        "rate": n / median(measured),
        "epoch_s": durations,
        "spans": spans,
        "images": n,
        "wall_s": wall,
        "end_to_end_rate": n * epochs / wall,
        "test_acc": backdoor.metrics.get("test_acc"),
        "test_asr": backdoor.metrics.get("test_asr"),
    }


# ------------------------------------------------------------------------------------- DataLoader baseline
def _per_image_dataset_class():
    import numpy as np
    import torch
    from PIL import Image

    class PerImagePoisoned(torch.utils.data.Dataset):
        """The conventional pipeline: clean uint8 images held on the host; __getitem__ stamps the trigger on a
        poisoned index, relabels it, converts the image to PIL and applies the per-image transform."""

        def __init__(self, x_clean, y, poisoned, poison_labels, mask, pattern, transform) -> None:
            self.images = x_clean.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) uint8
            self.labels = y.numpy().copy()
            self.poisoned = poisoned.numpy().copy()
            self.poison_labels = poison_labels.numpy().copy()
            self.mask = mask.permute(1, 2, 0).numpy()  # (H, W, 1|C) bool
            self.pattern = pattern.permute(1, 2, 0).numpy()  # (H, W, C) uint8
            self.transform = transform

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int):
            image, label = self.images[i], int(self.labels[i])
            if self.poisoned[i]:
                image = np.where(self.mask, self.pattern, image)
                label = int(self.poison_labels[i])
            pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
            return self.transform(pil), label

    return PerImagePoisoned


def build_loader_dataset(model: str, train_images: int, test_images: int):
    """The attack's poisoned training set, rebuilt the conventional way from the same clean split, the same
    poison indices (same seeded selection as build_poisoned_data) and the same 3x3 grid trigger."""
    import torch
    from torchvision import transforms

    from methods.attacks.badnets import make_badnets_trigger
    from methods.attacks.base import poison_targets, select_poison_indices
    from methods.data.base import load_splits

    cfg = attack_config(model, 1)
    seeds = cfg.seeds()
    splits = load_splits("synthetic", seeds["split_seed"], cfg=data_config(train_images, test_images))
    trigger = make_badnets_trigger(splits.info, cfg, seeds["poison_seed"])
    g = torch.Generator().manual_seed(seeds["poison_seed"])
    idx = select_poison_indices(splits.y_train, cfg.poison_rate, cfg.label_mode, cfg.target, cfg.poison_index_mode, g)
    poisoned = torch.zeros(len(splits.y_train), dtype=torch.bool)
    poisoned[idx] = True
    labels = poison_targets(splits.y_train, cfg.label_mode, cfg.target, splits.info.num_classes)
    info = splits.info
    steps = [transforms.RandomCrop(info.size, padding=info.crop_pad)]
    if info.hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps.append(transforms.ToTensor())
    dataset = _per_image_dataset_class()(
        splits.x_train,
        splits.y_train,
        poisoned,
        labels,
        trigger.tensors["mask"],
        trigger.tensors["pattern"],
        transforms.Compose(steps),
    )
    return dataset, cfg, info


def run_dataloader(ctx: BenchContext, model_name: str, dataset, cfg, info, workers: int, epochs: int) -> dict[str, Any]:
    """The same model, optimizer and batch size trained from a per-image DataLoader (fp32, as such loops run),
    with the per-step `loss.item()` of a conventional loop. One warm-up epoch, then `epochs` timed."""
    import torch
    import torch.nn.functional as F

    from methods.core.training import sgd
    from methods.models.base import build_model

    device = ctx.torch_device()
    torch.manual_seed(0)
    model = build_model(model_name, info).to(device)
    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    cuda = ctx.device == "cuda"
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, pin_memory=cuda, drop_last=False
    )
    durations = []
    for _ in range(1 + epochs):
        model.train()
        synchronize(device)
        started = time.perf_counter()
        total = 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=cuda), y.to(device, non_blocking=cuda)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        synchronize(device)
        durations.append(time.perf_counter() - started)
    return {
        "rate": len(dataset) / median(durations[1:]),
        "epoch_s": durations,
        "workers": workers,
        "mean_loss_last_epoch": total / max(1, math.ceil(len(dataset) / cfg.batch_size)),
    }


def loader_worker_counts(device: str) -> list[int]:
    return [2, 4] if device == "cuda" else [0, 2]


# -------------------------------------------------------------------------------------------------- benches
def bench_train(ctx: BenchContext, model: str) -> list[Row]:
    """train.<model>: the method's training img/s against the best conventional DataLoader pipeline."""
    sizes = ctx.sizes
    name = f"train.{model}"
    ctx.probe.reset()
    ctx.log(f"{name}: method on {sizes.train_images} images")
    method = run_method(ctx, model, sizes.train_images)
    row = ctx.probe.fill(
        Row(
            name=name,
            measured=method["rate"],
            unit="img/s",
            baseline_unit="img/s",
            what=f"BadNets method training vs per-image DataLoader, {model}, "
            f"{method['images']} synthetic 32x32, bs 128",
        )
    )
    dataset, cfg, info = build_loader_dataset(model, sizes.train_images, sizes.test_images)
    loaders = {}
    for workers in loader_worker_counts(ctx.device):
        ctx.probe.reset()
        ctx.log(f"{name}: DataLoader num_workers={workers}")
        with ctx.probe.tree():
            result = run_dataloader(ctx, model, dataset, cfg, info, workers, sizes.loader_epochs)
        result["peak_host_mb"] = ctx.probe.host_mb()
        result["peak_gpu_mb"] = ctx.probe.gpu_mb()
        loaders[workers] = result
    best = max(loaders, key=lambda w: loaders[w]["rate"])
    row.baseline = loaders[best]["rate"]
    others = ", ".join(f"num_workers={w}: {loaders[w]['rate']:,.0f} img/s" for w in sorted(loaders))
    row.note = (
        f"baseline = DataLoader num_workers={best} (the faster; {others}); method end-to-end incl. per-epoch "
        f"eval+checkpoint {method['end_to_end_rate']:,.0f} img/s"
    )
    row.details = {
        "method": _strip(method),
        "dataloader": {str(w): r for w, r in loaders.items()},
        "best_workers": best,
    }
    return [row]


def bench_train_fast(ctx: BenchContext, model: str, batch_size: int = 128) -> list[Row]:
    """train.<model>.fast[.b<batch>]: the method with its fast path switched on against the same method with it
    off, at the methods' batch size of 128 unless the row names another."""
    sizes = ctx.sizes
    name = f"train.{model}.fast" + (f".b{batch_size}" if batch_size != 128 else "")
    ctx.probe.reset()
    ctx.log(f"{name}: fast path off")
    plain = run_method(ctx, model, sizes.train_images, batch_size=batch_size)
    plain_host, plain_gpu = ctx.probe.host_mb(), ctx.probe.gpu_mb()
    ctx.probe.reset()
    ctx.log(f"{name}: fast path")
    fast = run_method(ctx, model, sizes.train_images, fast=True, batch_size=batch_size)
    target = FAST_GOALS.get((model, batch_size))
    goal = Goal("measured", ">=", target) if (ctx.device == "cuda" and target) else None
    row = ctx.probe.fill(
        Row(
            name=name,
            measured=fast["rate"],
            baseline=plain["rate"],
            unit="img/s",
            baseline_unit="img/s",
            goal=goal,
            what=f"method with bf16 autocast + channels_last{f' + compile ({ctx.compile})' if ctx.compile else ''} "
            f"vs the path off, "
            f"{model}, {fast['images']} images, batch {batch_size}",
        )
    )
    row.note = (
        f"methods.core.fastpath on vs off (same maths; on is the default on CUDA; the ratio's goal on a GPU "
        f"is >= {FAST_RATIO_GOAL}); first epoch (warm-up incl. any compilation) {fast['epoch_s'][0]:.1f} s "
        f"vs {plain['epoch_s'][0]:.1f} s off; "
        f"test_acc on {fast['test_acc']:.3f} vs off {plain['test_acc']:.3f}; "
        f"torch.compile {ctx.compile or 'off (--compile [MODE] turns it on)'}"
    )
    row.details = {
        "fast": _strip(fast),
        "off": _strip(plain),
        "off_peak_host_mb": plain_host,
        "off_peak_gpu_mb": plain_gpu,
    }
    return [row]


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "spans"}


# ---------------------------------------------------------------------------------------- sharing a device
def share_child(args: dict[str, Any]) -> dict[str, Any]:
    """One of the concurrent training processes: train the method, tell the parent when the warm-up epoch is
    done, wait for everyone, then time the measured epochs (wall clock, comparable across processes)."""
    import torch

    from benchmarks.common import MemoryProbe, sizes_for

    device = args["device"]
    torch.set_num_threads(args["threads"])
    sizes = sizes_for(args["quick"], device)
    ctx = BenchContext(
        device=device, quick=args["quick"], sizes=sizes, probe=MemoryProbe(device), scratch=Path(args["scratch"])
    )
    ctx.probe.reset()
    ready, go = Path(args["ready"]), Path(args["go"])

    def on_epoch_end(done: int) -> None:
        if done == sizes.warmup_epochs:
            ready.write_text(str(os.getpid()))
            deadline = time.monotonic() + 1800
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    result = run_method(
        ctx, args["model"], args["images"], on_epoch_end=on_epoch_end, epochs=sizes.warmup_epochs + args["epochs"]
    )
    measured = result["spans"][sizes.warmup_epochs :]
    return {
        "start": measured[0][0],
        "end": measured[-1][1],
        "images": result["images"] * len(measured),
        "rate": result["rate"],
        "peak_host_mb": ctx.probe.host_mb(),
        "peak_gpu_mb": ctx.probe.gpu_mb(),
    }


def _run_group(ctx: BenchContext, model: str, processes: int) -> dict[str, Any]:
    sizes = ctx.sizes
    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // processes) if ctx.device == "cpu" else max(1, min(4, cores // processes))
    folder = ctx.scratch / f"share-{processes}-{time.time_ns()}"
    folder.mkdir(parents=True)
    go = folder / "go"
    children = []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": str(threads),
    }
    for i in range(processes):
        spec = {
            "device": ctx.device,
            "quick": ctx.quick,
            "model": model,
            "images": sizes.share_images,
            "epochs": sizes.share_epochs,
            "threads": threads,
            "scratch": str(folder),
            "ready": str(folder / f"ready-{i}"),
            "go": str(go),
        }
        out = folder / f"result-{i}.json"
        command = [sys.executable, "-m", "benchmarks.worker", "--share-child", json.dumps(spec), "--out", str(out)]
        log = open(folder / f"log-{i}.txt", "w")
        children.append(
            (
                subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT),
                out,
                log,
                folder / f"ready-{i}",
            )
        )
    deadline = time.monotonic() + 3600
    while not all(r.exists() for _, _, _, r in children):
        if any(p.poll() not in (None, 0) for p, _, _, _ in children) or time.monotonic() > deadline:
            for p, _, _, _ in children:
                if p.poll() is None:
                    p.kill()
            logs = " | ".join((folder / f"log-{i}.txt").read_text()[-400:] for i in range(processes))
            raise RuntimeError(f"a sharing child failed before its warm-up ended: {logs}")
        time.sleep(0.02)
    go.write_text("go")
    results = []
    for i, (proc, out, log, _) in enumerate(children):
        code = proc.wait()
        log.close()
        if code != 0:
            raise RuntimeError(f"sharing child {i} exited {code}: {(folder / f'log-{i}.txt').read_text()[-800:]}")
        results.append(json.loads(out.read_text()))
    window = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {
        "rate": sum(r["images"] for r in results) / window,
        "per_process": results,
        "threads": threads,
        "peak_host_mb": sum(r["peak_host_mb"] for r in results),
        "peak_gpu_mb": sum(r["peak_gpu_mb"] for r in results) if ctx.device == "cuda" else math.nan,
    }


def bench_share(ctx: BenchContext, model: str, processes: int = 4) -> list[Row]:
    """share<k>.<model>: k concurrent training processes on one device (fractional-GPU trials) against one."""
    name = f"share{processes}.{model}"
    ctx.log(f"{name}: one process")
    one = _run_group(ctx, model, 1)
    ctx.log(f"{name}: {processes} processes")
    many = _run_group(ctx, model, processes)
    goal = Goal("ratio", ">=", 2.5) if ctx.device == "cuda" else None
    row = Row(
        name=name,
        measured=many["rate"],
        baseline=one["rate"],
        unit="img/s",
        baseline_unit="img/s",
        goal=goal,
        what=f"{processes} concurrent method processes ({model}, {ctx.sizes.share_images} images each) "
        f"vs 1 process, aggregate training img/s",
        peak_host_mb=many["peak_host_mb"],
        peak_gpu_mb=many["peak_gpu_mb"],
    )
    row.note = (
        f"peaks are the sum over the {processes} processes; torch threads per process: {many['threads']} "
        f"(one process alone: {one['threads']})"
    )
    if ctx.device == "cpu":
        row.note += "; on a CPU the processes split the cores, so ~1 is the ideal"
    row.details = {"one": one, "many": many}
    return [row]
