"""The natural-image GPU check: BadNets and Blend trained on CIFAR-10 (JPEG copy) with CIFAR-10's paper recipe
(search_spaces/presets/cifar10/), then AFT, D-BR and ASD on each backdoored model with their CIFAR-10 presets,
within about 5 minutes on one H200. Pure torch: it runs the methods through methods.core.context.LocalContext,
as tests/methods do, so a machine with torch, torchvision, Pillow, PyYAML and safetensors is enough (no Ray, no
MLflow; nothing from orchestrator/ is imported).

What is shortened to fit, and so recorded in the JSON as an override of the preset: the attacks' 100 epochs
(--epochs, default 20), D-BR's centroid fine-tuning and rounds, and ASD's 120 x 1,024 MixMatch iterations
(GPU_DEFENSE_SETS below). `--defense-set NAME.KEY=VALUE` layers more over them. Steps run in a fixed order
(every attack, then each attack's defenses) and one that would start after --budget-s seconds is skipped and
recorded as such; the JSON is rewritten after every step, so a run stopped by `timeout` keeps what finished.

The data is the JPEG copy of CIFAR-10 (methods/data/folders.py), so its figures are "CIFAR-10 (JPEG copy)",
never CIFAR-10. `--device cpu --tiny` runs the same steps on a few hundred images with small_cnn and one epoch
per method, in seconds (tests/unit/test_gpu_natural.py). docs/reproduce-cifar10.md describes the schedule and
its time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a file (python scripts/gpu-natural.py): the checkout's packages, installed or not.
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import methods  # noqa: E402, F401  (declares every method)
from methods.core.context import LocalContext  # noqa: E402
from methods.core.fastpath_config import FastPath  # noqa: E402
from methods.core.method import get_method, method_names  # noqa: E402
from methods.core.yaml_rules import read_yaml  # noqa: E402  (YAML 1.2 numbers, as bdo reads presets)
from methods.data.base import load_splits  # noqa: E402
from methods.data.configs import DATASET_INFOS, DataConfig, absent_dataset  # noqa: E402

DATASET = "cifar10_jpeg"
LABEL = "CIFAR-10 (JPEG copy)"
PRESETS = ROOT / "search_spaces" / "presets"
ATTACKS = ("badnets", "blend")
DEFENSES = ("aft", "dbr", "asd")
HEADLINE = ("test_acc", "test_asr", "val_acc", "val_asr")
BUDGET_S = 300

# Attack epochs at the preset's batch 128: one epoch of 47,500 images takes ~3.6 s on one H200 (~14,600 img/s
# training plus evaluation), so 2 attacks x 20 epochs take ~150 s of the budget and the six defense runs the rest.
GPU_EPOCHS = 20
# Shortened schedules on the GPU (AFT's preset, 20 epochs on 2,375 clean images, fits as it is):
# - D-BR: the short model's centroid fine-tuning is 10 passes over the 47,500 images (~36 s) and dominates; 2 of
#   them and 10 of the 20 unlearn/relearn rounds bring a run to ~27 s.
# - ASD: the paper's 120 x 1,024 MixMatch iterations take 30-45 min; 10 x 48 keep all three stages (5 / 3 / 2
#   epochs) in ~25-35 s (each epoch also scores all 47,500 images). class_period 1: with the preset's 5, stage 1
#   (epochs 0-4) would add no image to the seeds.
GPU_DEFENSE_SETS = {
    "dbr": {"sd_ft_epochs": 2, "br_rounds": 10},
    "asd": {"epochs": 10, "iterations_per_epoch": 48, "class_period": 1},
}
# --tiny: every length count at 1 (ASD: 2 MixMatch iterations), so a CPU runs each method in about a second.
TINY_DEFENSE_SETS = {
    "aft": {"epochs": 1, "adv_epochs": 1},
    "dbr": {"sd_pretrain_epochs": 1, "sd_ft_epochs": 1, "br_rounds": 1},
    "asd": {"epochs": 1, "iterations_per_epoch": 2},
}
TINY_DATA = {"train_limit": 400, "test_limit": 200, "val_fraction": 0.01}


def default_data_root() -> Path:
    """$BDO_DATA_ROOT when set; else shared/data inside the checkout when it holds the dataset (where a GPU machine
    that is sent a copy of the checkout finds it); else the shared/data beside the checkout."""
    if os.environ.get("BDO_DATA_ROOT"):
        return Path(os.environ["BDO_DATA_ROOT"])
    inside = ROOT / "shared" / "data"
    return inside if absent_dataset(DATASET_INFOS.get(DATASET), inside) is None else ROOT.parent / "shared" / "data"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", type=Path, default=None,
                   help="folder holding cifar10-jpeg/ or cifar10-jpeg.tar.gz (default: $BDO_DATA_ROOT, else the "
                        "checkout's shared/data when it holds one, else ../shared/data)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--model", default=None, help="model of every run (default: resnet18; small_cnn with --tiny)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"attack epochs instead of the preset's (default: {GPU_EPOCHS}; 1 with --tiny)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated attacks")
    p.add_argument("--defenses", default=",".join(DEFENSES), help="comma-separated defenses, run on every attack")
    p.add_argument("--defense-set", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="override a defense's config key (YAML value), over its preset and the shortened schedule")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"skip every step that would start after this many seconds (default: {BUDGET_S})")
    p.add_argument("--tiny", action="store_true",
                   help=f"test form: data limits {TINY_DATA}, small_cnn, one epoch per method")
    p.add_argument("--json", type=Path, default=Path("natural.json"), help="where the results go")
    p.add_argument("--verbose", action="store_true", help="print every step each method reports")
    return p.parse_args(argv)


def parse_defense_sets(items: list[str], defenses: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise SystemExit(f"--defense-set {item!r}: expected NAME.KEY=VALUE, e.g. asd.epochs=10")
        if name not in defenses:
            raise SystemExit(f"--defense-set {item!r}: {name} is not among --defenses ({', '.join(defenses)})")
        out.setdefault(name, {})[field] = read_yaml(raw)
    return out


def preset_file(method: str) -> Path:
    """The method's preset for this dataset: the folder the dataset's declaration names (CIFAR-10's)."""
    return PRESETS / DATASET_INFOS.get(DATASET).preset_folder / f"{method}.yaml"


def preset_name(method: str) -> str | None:
    path = preset_file(method)
    return str(path.relative_to(ROOT)) if path.is_file() else None


def preset_values(method: str) -> dict[str, Any]:
    path = preset_file(method)
    return (read_yaml(path.read_text()) or {}) if path.is_file() else {}


def method_config(name: str, kind: str, values: dict[str, Any]):
    """The config of the `kind` method `name` from these values; a bad one stops the check before anything runs."""
    if name not in method_names(kind):
        raise SystemExit(f"{name}: not one of the {kind}s ({', '.join(method_names(kind))})")
    try:
        return get_method(name).make_config(values)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"{name}: {error}") from None


def finite_or_none(value: Any) -> float | None:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def metrics_of(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The headline metrics and every metric the run returned (non-finite ones as null: JSON has no NaN)."""
    every = {k: finite_or_none(v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))}
    return {k: every.get(k) for k in HEADLINE}, every


def machine(device: torch.device) -> dict[str, Any]:
    import torchvision

    info = {"device": str(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count()}
    info["name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return info


def data_counts(cfg, data_root: Path, data_cfg: DataConfig) -> dict[str, Any]:
    """Load the splits the attacks will train on, timed: the first load converts the archive once into
    data_root/bdo_cache, which every attack then reads."""
    began = time.monotonic()
    splits = load_splits(DATASET, cfg.seeds()["split_seed"], data_root, False, data_cfg)
    return {"train": len(splits.y_train), "val": len(splits.y_val), "test": len(splits.y_test),
            "classes": splits.info.num_classes, "load_s": round(time.monotonic() - began, 2)}


class Check:
    """The run's record: written to --json after every step, so a run stopped from outside keeps what finished."""

    def __init__(self, args: argparse.Namespace, record: dict[str, Any]) -> None:
        self.args, self.record, self.start = args, record, time.monotonic()
        self.failed = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def save(self) -> None:
        self.record["elapsed_s"] = round(self.elapsed(), 1)
        tmp = self.args.json.with_name(self.args.json.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=1) + "\n")
        os.replace(tmp, self.args.json)

    def step(self, entry: dict[str, Any], what: str, body) -> Any:
        """Run `body()` (returning the run's result and its metrics) into `entry` unless the budget is spent; a
        failure is recorded and the check goes on with the next step. Returns the result, or None."""
        if self.elapsed() >= self.args.budget_s:
            entry["skipped"] = f"budget: {self.elapsed():.0f} s of --budget-s {self.args.budget_s:g} spent"
            print(f"{what}: skipped ({entry['skipped']})", flush=True)
            self.save()
            return None
        began = time.monotonic()
        try:
            result, metrics = body()
        except Exception as error:  # one failing method must not hide the others' results
            traceback.print_exc()
            entry["error"] = f"{type(error).__name__}: {error}"
            self.failed = True
            result = None
        else:
            entry["metrics"], entry["details"] = metrics_of(metrics)
            shown = " ".join(f"{k} {v:.4f}" if v is not None else f"{k} nan" for k, v in entry["metrics"].items())
            print(f"{what}: {shown} ({time.monotonic() - began:.1f} s)", flush=True)
        entry["wall_s"] = round(time.monotonic() - began, 2)
        self.save()
        return result


def table(record: dict[str, Any]) -> str:
    rows = [["attack", "defense", *HEADLINE, "wall_s", ""]]
    for attack, entry in record["attacks"].items():
        for name, run in [("-", entry), *entry["defenses"].items()]:
            values = run.get("metrics") or {}
            note = run.get("skipped") or run.get("error")
            rows.append([attack, name, *("-" if values.get(k) is None else f"{values[k]:.4f}" for k in HEADLINE),
                         "-" if note or "wall_s" not in run else f"{run['wall_s']:.1f}", f"({note})" if note else ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = args.model or ("small_cnn" if args.tiny else "resnet18")
    epochs = args.epochs or (1 if args.tiny else GPU_EPOCHS)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    defenses = [d.strip() for d in args.defenses.split(",") if d.strip()]
    user_sets = parse_defense_sets(args.defense_set, defenses)
    data_root = (args.data_root or default_data_root()).expanduser().resolve()
    data_cfg = DataConfig.from_dict(TINY_DATA if args.tiny else {})
    shortened = TINY_DEFENSE_SETS if args.tiny else GPU_DEFENSE_SETS

    record: dict[str, Any] = {
        "check": "scripts/gpu-natural.py", "results_are": LABEL, "argv": sys.argv[1:] if argv is None else argv,
        "tiny": args.tiny, "budget_s": args.budget_s, "machine": machine(device),
        # what LocalContext trains with here (bf16, channels_last, cuDNN autotuning on CUDA): the times depend on it
        "fast_path": FastPath().resolved(device),
        "data": {"dataset": DATASET, "data_root": str(data_root), "data_config": data_cfg.to_dict()},
        "model": model, "attacks": {},
    }
    check = Check(args, record)
    attack_cfgs = {}
    for name in attacks:
        preset = preset_values(name)
        overrides = {"dataset": DATASET, "model": model, "epochs": epochs}
        attack_cfgs[name] = method_config(name, "attack", {**preset, **overrides})
        record["attacks"][name] = {
            "preset": preset_name(name), "overrides": overrides,
            "epochs": {"run": epochs, "preset": preset.get("epochs"),
                       "shortened": preset.get("epochs") is not None and epochs < preset["epochs"]},
            "config": attack_cfgs[name].to_dict(), "defenses": {},
        }
    defense_cfgs = {}
    for name in defenses:
        overrides = {**shortened.get(name, {}), **user_sets.get(name, {})}
        defense_cfgs[name] = (method_config(name, "defense", {**preset_values(name), **overrides}), overrides)

    print(f"{LABEL} from {data_root} on {record['machine']['name']} ({device}), model {model}, attacks {epochs} "
          f"epochs, budget {args.budget_s:g} s", flush=True)
    try:
        record["data"].update(data_counts(attack_cfgs[attacks[0]], data_root, data_cfg))
    except Exception as error:  # recorded: nothing else can run without the data
        traceback.print_exc()
        record["data"]["error"] = f"{type(error).__name__}: {error}"
        check.save()
        return 1
    data = record["data"]
    print(f"data: {data['train']} train / {data['val']} val / {data['test']} test ({data['load_s']:.1f} s)", flush=True)
    check.save()

    def context(**fields) -> LocalContext:
        return LocalContext(device=device, data_root=data_root, data_config=data_cfg, verbose=args.verbose, **fields)

    backdoors = {}
    for name in attacks:
        spec, cfg = get_method(name), attack_cfgs[name]

        def attack(spec=spec, cfg=cfg):
            backdoor = spec.run(context(), cfg)
            return backdoor, backdoor.metrics

        backdoors[name] = check.step(record["attacks"][name], name, attack)
    for attack_name in attacks:
        for name in defenses:
            cfg, overrides = defense_cfgs[name]
            entry = record["attacks"][attack_name]["defenses"][name] = {
                "preset": preset_name(name), "overrides": overrides, "config": cfg.to_dict()}
            backdoor = backdoors[attack_name]
            if backdoor is None:
                entry["skipped"] = f"the {attack_name} model was not trained"
                continue

            def defend(spec=get_method(name), cfg=cfg, backdoor=backdoor):
                result = spec.run(context(backdoor_provider=lambda: backdoor), cfg)
                return result, result.metrics

            check.step(entry, f"{attack_name} -> {name}", defend)
    check.save()
    print(f"\n{LABEL}, {model}, {record['machine']['name']}: {record['data']['train']} training images, "
          f"{record['elapsed_s']:.0f} s in all\n{table(record)}\nwritten to {args.json}", flush=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
