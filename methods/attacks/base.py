"""What every poisoning attack shares: its config, index selection and label rules, the poisoned dataset, the
backdoored-model artifact that defenses consume, evaluation (ACC / ASR / RA), and the standard training recipe
(run by methods.core.engine).

Poisoning happens at the dataset level, before augmentation (docs/methods.md#conventions); validation and test
images are kept clean and get the trigger only at evaluation time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from methods.attacks.configs.shared import AttackConfig
from methods.attacks.triggers import Trigger, trigger_from_state
from methods.core.blind_signals import BlindSignals
from methods.core.context import RunContext
from methods.core.engine import Engine
from methods.core.metrics import accuracy
from methods.core.training import make_generator, predict_logits, sgd, unwrap
from methods.data.augment import standard_augment
from methods.data.base import Splits, load_splits
from methods.data.configs import DATASET_INFOS, DatasetInfo
from methods.models.base import BackdoorModel, build_model


def poison_targets(y: torch.Tensor, label_mode: str, target: int, num_classes: int) -> torch.Tensor:
    if label_mode == "all2one":
        return torch.full_like(y, target)
    if label_mode == "all2all":
        return (y + 1) % num_classes
    return y.clone()  # cleanLabel keeps labels


def select_poison_indices(
    y: torch.Tensor, rate: float, label_mode: str, target: int, mode: str, generator: torch.Generator
) -> torch.Tensor:
    """Sorted indices of the training images to poison (see POISON_INDEX_MODES)."""
    n = len(y)
    if label_mode == "cleanLabel":
        candidates = torch.nonzero(y == target).flatten()
    elif label_mode == "all2one" and mode != "uniform":
        candidates = torch.nonzero(y != target).flatten()
    else:
        candidates = torch.arange(n)
    if mode == "bernoulli":
        picked = candidates[torch.rand(len(candidates), generator=generator) < rate]
    else:
        base = n if (mode == "uniform" and label_mode != "cleanLabel") else len(candidates)
        count = min(int(rate * base), len(candidates))
        picked = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    return picked.sort().values


@dataclass
class PoisonedData:
    """The poisoned training set with its ground truth, and clean validation/test sets."""

    info: DatasetInfo
    trigger: Trigger
    label_mode: str
    target: int
    x_train: torch.Tensor  # uint8, poisoned where poison_flags
    y_train: torch.Tensor  # labels as trained
    y_train_orig: torch.Tensor
    poison_flags: torch.Tensor  # bool
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    _backdoor_sets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def to(self, device: torch.device) -> PoisonedData:
        tensors = {k: v.to(device) for k, v in self.__dict__.items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in self.__dict__.items() if not isinstance(v, torch.Tensor) and k != "_backdoor_sets"}
        return PoisonedData(**others, **tensors)

    def clean_set(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.x_val, self.y_val) if split == "val" else (self.x_test, self.y_test)

    def backdoor_set(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(triggered images, attack targets, true labels) for the ASR/RA of `split`; built once per split."""
        if split not in self._backdoor_sets:
            x, y = self.clean_set(split)
            keep = torch.ones_like(y, dtype=torch.bool) if self.label_mode == "all2all" else y != self.target
            xs, ys = x[keep], y[keep]
            self._backdoor_sets[split] = (
                self.trigger.apply(xs, test=True),
                poison_targets(
                    ys, "all2one" if self.label_mode == "cleanLabel" else self.label_mode, self.target, self.num_classes
                ),
                ys,
            )
        return self._backdoor_sets[split]

    @property
    def poison_fraction(self) -> float:
        return self.poison_flags.float().mean().item()


def evaluate(model: nn.Module, data: PoisonedData, splits=("val", "test"), batch_size: int = 1024) -> dict[str, float]:
    """ACC, ASR and RA of `model` on the given splits (eval mode, un-augmented images)."""
    out: dict[str, float] = {}
    for split in splits:
        x, y = data.clean_set(split)
        out[f"{split}_acc"] = accuracy(predict_logits(model, x, batch_size).argmax(1), y)
        xb, yt, ytrue = data.backdoor_set(split)
        pred = predict_logits(model, xb, batch_size).argmax(1)
        out[f"{split}_asr"] = accuracy(pred, yt)
        out[f"{split}_ra"] = accuracy(pred, ytrue)
    return out


@dataclass
class Backdoor:
    """A trained backdoored model together with the data it was trained on: what every defense starts from."""

    attack: str
    config: dict[str, Any]
    data: PoisonedData
    model_name: str
    model_state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    seeds: dict[str, int]
    # How a defense run computes its blind signals, and the canary it planted (methods/core/blind_signals.py);
    # set by the method dispatch from the defense's config, never saved with the artifact (None: the defaults).
    blind: BlindSignals | None = None

    def build_model(self, device: torch.device | str = "cpu") -> BackdoorModel:
        model = build_model(self.model_name, self.data.info)
        model.load_state_dict(self.model_state)
        return model.to(device)

    def to(self, device: torch.device) -> Backdoor:
        return Backdoor(
            self.attack,
            self.config,
            self.data.to(device),
            self.model_name,
            self.model_state,
            self.metrics,
            self.seeds,
            self.blind,
        )

    # Saved as safetensors (tensors) plus JSON (everything else): loading never executes code.
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        d = self.data
        tensors = {
            **{
                f"data.{k}": getattr(d, k).cpu().contiguous()
                for k in ("x_train", "y_train", "y_train_orig", "poison_flags", "x_val", "y_val", "x_test", "y_test")
            },
            **{f"trigger.{k}": v.contiguous() for k, v in d.trigger.tensors.items()},
            **{f"model.{k}": v.cpu().contiguous() for k, v in self.model_state.items()},
        }
        save_file(tensors, str(directory / "backdoor.safetensors"))
        meta = {
            "attack": self.attack,
            "config": self.config,
            "model_name": self.model_name,
            "metrics": self.metrics,
            "seeds": self.seeds,
            "info": d.info.__dict__,
            "label_mode": d.label_mode,
            "target": d.target,
            "trigger": {"kind": d.trigger.kind, "params": d.trigger.params},
        }
        (directory / "backdoor.json").write_text(json.dumps(meta, indent=1, sort_keys=True))

    @staticmethod
    def load(directory: Path) -> Backdoor:
        from safetensors.torch import load_file

        meta = json.loads((directory / "backdoor.json").read_text())
        tensors = load_file(str(directory / "backdoor.safetensors"))
        part = lambda prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        info_fields = dict(meta["info"])
        for key in ("mean", "std"):
            info_fields[key] = tuple(info_fields[key])
        # The radius of the blind signals is the dataset's setting, not part of what was trained: an artifact
        # saved before its dataset declared (or changed) one is measured with the declared radius.
        if info_fields["name"] in DATASET_INFOS:
            info_fields["adv_concentration_eps"] = DATASET_INFOS.get(info_fields["name"]).adv_concentration_eps
        info = DatasetInfo(**info_fields)
        trigger = trigger_from_state(meta["trigger"]["kind"], meta["trigger"]["params"], part("trigger."))
        data = PoisonedData(
            info=info, trigger=trigger, label_mode=meta["label_mode"], target=meta["target"], **part("data.")
        )
        return Backdoor(
            meta["attack"], meta["config"], data, meta["model_name"], part("model."), meta["metrics"], meta["seeds"]
        )


TriggerFactory = Callable[[DatasetInfo, Any, int], Trigger]
PoisonHook = Callable[..., torch.Tensor]


def build_poisoned_data(
    splits: Splits,
    cfg: AttackConfig,
    trigger: Trigger,
    poison_seed: int,
    poison_images: Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> PoisonedData:
    """Select the poison indices, apply the trigger (or the attack's own `poison_images`) and relabel."""
    info = splits.info
    if not 0 <= cfg.target < info.num_classes:
        raise ValueError(f"target: {cfg.target} is not a class of {info.name} (0..{info.num_classes - 1})")
    g = torch.Generator().manual_seed(poison_seed)
    x, y = splits.x_train.clone(), splits.y_train.clone()
    idx = select_poison_indices(y, cfg.poison_rate, cfg.label_mode, cfg.target, cfg.poison_index_mode, g)
    if len(idx):
        x[idx] = poison_images(x[idx], y[idx], g) if poison_images else trigger.apply(x[idx], test=False, generator=g)
        y[idx] = poison_targets(y[idx], cfg.label_mode, cfg.target, info.num_classes)
    flags = torch.zeros(len(y), dtype=torch.bool)
    flags[idx] = True
    return PoisonedData(
        info=info,
        trigger=trigger,
        label_mode=cfg.label_mode,
        target=cfg.target,
        x_train=x,
        y_train=y,
        y_train_orig=splits.y_train.clone(),
        poison_flags=flags,
        x_val=splits.x_val,
        y_val=splits.y_val,
        x_test=splits.x_test,
        y_test=splits.y_test,
    )


def with_implant(metrics: dict[str, float]) -> dict[str, float]:
    """Add `<split>_implant` = min(ACC, ASR): one number an attack sweep can maximise that rewards ASR only while
    clean accuracy keeps up (a backdoor bought by losing a class scores its ACC, not its ASR). Defenses do not
    report it; for them a low ASR is the goal."""
    for split in ("val", "test"):
        if f"{split}_acc" in metrics and f"{split}_asr" in metrics:
            metrics[f"{split}_implant"] = min(metrics[f"{split}_acc"], metrics[f"{split}_asr"])
    return metrics


def train_classifier(
    ctx: RunContext,
    model: nn.Module,
    data: PoisonedData,
    cfg: AttackConfig,
    train_seed: int,
    augment: Callable[[torch.Tensor, DatasetInfo, torch.Generator], torch.Tensor] | None = standard_augment,
    report: bool = True,
    constants: dict[str, float] | None = None,
) -> dict[str, float]:
    """The standard recipe (SGD with momentum, cosine schedule) on the poisoned set, one epoch a step. Reports
    val/test ACC, ASR, RA and implant each epoch, plus `constants` (facts fixed before training, such as the poison
    count) so every step and the final metrics carry them and a sweep's table shows them next to ASR. With
    `report=False` (a helper model trained inside an attack, before the run's own training) it neither reports nor
    checkpoints, and returns its final metrics."""
    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    use_augment = augment is not None and cfg.augment

    def evaluated() -> dict[str, float]:
        return with_implant(evaluate(unwrap(model), data, batch_size=cfg.eval_batch_size))

    engine = Engine(ctx)
    stage = engine.epochs(
        "train",
        cfg.epochs,
        model,
        data.x_train,
        data.y_train,
        cfg.batch_size,
        optimizer=optimizer,
        generator=make_generator(train_seed, ctx.device),
        scheduler=scheduler,
        extra=constants,
        evaluate=evaluated,
        augment=(lambda xb, g: augment(xb, data.info, g)) if use_augment else None,
    )
    if not report:
        for epoch in range(cfg.epochs):
            stage.run(epoch)
        return {**evaluated(), **(constants or {})}
    metrics = engine.run([stage])[1]
    # a run resumed after its last epoch trains and reports nothing; its metrics are those of the restored model
    return metrics or {**evaluated(), **(constants or {})}


def run_attack(
    ctx: RunContext,
    name: str,
    cfg: AttackConfig,
    make_trigger: TriggerFactory,
    poison_images_factory: Callable[..., Any] | None = None,
    augment=standard_augment,
    postprocess: Callable[[PoisonedData, dict[str, int]], None] | None = None,
) -> Backdoor:
    """Load the data, poison it, train the backdoored model, and return the Backdoor artifact.
    `poison_images_factory` replaces plain trigger stamping (CL); `postprocess` edits the poisoned set before
    training (WaNet's noise-mode images). Both may add diagnostics to the `facts` dict they are handed; those,
    with `poison_count`, are reported at every step, because an attack that poisons too few images or whose
    poisoning step did nothing otherwise shows up only as a low ASR with no hint why."""
    seeds = cfg.seeds()
    splits = load_splits(cfg.dataset, seeds["split_seed"], ctx.data_root, ctx.download, ctx.data_config)
    trigger = make_trigger(splits.info, cfg, seeds["poison_seed"])
    facts: dict[str, float] = {}
    poison_images = poison_images_factory(ctx, cfg, splits, trigger, seeds, facts) if poison_images_factory else None
    data = build_poisoned_data(splits, cfg, trigger, seeds["poison_seed"], poison_images)
    if postprocess is not None:
        postprocess(data, seeds, facts)
    data = data.to(ctx.device)
    torch.manual_seed(seeds["train_seed"])
    model = build_model(cfg.model, data.info).to(ctx.device)
    count = int(data.poison_flags.sum())
    facts = {"poison_count": float(count), **facts}
    if cfg.label_mode == "cleanLabel":
        # The papers poison about a tenth of the target class (at most half in their ablations); beyond that the
        # trigger and the class become one feature, and a defense that removes one removes the other.
        in_class = int((data.y_train_orig == cfg.target).sum())
        facts["poison_class_fraction"] = count / max(in_class, 1)
    departures = cfg.departures_from_papers()
    if departures is not None:
        facts["papers_regime"] = float(not departures)
        for departure in departures:
            ctx.progress(f"{name}: not the papers' attack ({departure})")
    ctx.progress(
        f"{name} on {cfg.dataset}: poison_count {count} of {len(data.y_train)} training images "
        f"({cfg.label_mode}, poison_rate {cfg.poison_rate})"
        + "".join(f", {k} {v:.4g}" for k, v in facts.items() if k != "poison_count")
    )
    metrics = train_classifier(ctx, model, data, cfg, seeds["train_seed"], augment, constants=facts)
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    return Backdoor(
        attack=name,
        config=cfg.to_dict(),
        data=data,
        model_name=cfg.model,
        model_state=state,
        metrics=metrics,
        seeds=seeds,
    )
