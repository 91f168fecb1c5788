"""Blind quality signals every defense reports next to ACC (docs/methods.md#blind-signals): trigger-free measures
a defender can compute, so that a `knowledge: blind` sweep has more to select on than clean accuracy.

- `adv_concentration`: untargeted L-inf PGD examples of a fixed subsample of clean held-out images; the share of
  them that lands in the single most frequent predicted class. Mu et al. ("Progressive Backdoor Erasing via
  connecting Backdoor and Adversarial Attacks", CVPR 2023) observe that in a backdoored model adversarial
  perturbations behave like the trigger and pile up in the target class, while a clean model spreads them over
  many classes. Lower is better for a defense.
- `canary_asr`: the defender's own backdoor (methods/defenses/shared/canary.py), planted before the defense; its ASR
  after the defense, measured with the canary trigger the defender knows. Lower is better.
- `label_excess`: over the training labels, the largest share of (a fixed subsample of) the training images carrying
  a label that the model does not predict as it, minus that class's error on the clean held-out split. A
  dirty-label backdoor gives the target's label to images of other classes; a model that keeps the backdoor
  predicts them as that label, one without it predicts their own class, so the label loses far more of its
  images than its clean error explains (about half of it at 10% all-to-one). Higher is better. It does not see
  clean-label attacks, whose poisoned images keep their own labels.
- `blind_score`: acc - adv_concentration (methods/defenses/shared/common.py, which has the accuracy), the blind analogue
  of ACC - ASR: a repaired model keeps its clean accuracy and spreads adversarial examples over the classes.
  Higher is better.

A defense's step reports carry the validation split's signals only (sweeps select on validation); the test
split's are measured once, for the model the defense returns (methods.defenses.shared.common.final_result).

Computing them may change no number a method computes: they draw from their own generators (never the global RNG
nor a method's), run on the bare model in fp32 eval mode and restore its mode, and take gradients with respect to
the input only (no parameter's .grad is touched). They are a pure function of the weights: the same subsample and
the same PGD random start at every report, so the final evaluation of unchanged weights reproduces the last report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from methods.core.metrics import accuracy
from methods.core.pgd import pgd_untargeted
from methods.core.training import predict_logits, to_float, unwrap

SPLITS = ("val", "test")
# The usual radius of CIFAR-like images; a dataset declares its own in DatasetInfo.adv_concentration_eps.
DEFAULT_EPS = 8 / 255


@dataclass(frozen=True)
class Canary:
    """The defender's own backdoor: a trigger (methods.attacks.triggers.Trigger) and the class it leads to."""

    trigger: Any
    target: int
    # the canary-stamped evaluation sets, built once per (split, device)
    _sets: dict = field(default_factory=dict, compare=False, repr=False)

    def stamped(self, split: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The images of `split` whose label is not the canary target, with the canary trigger applied."""
        key = (split, str(x.device))
        if key not in self._sets:
            self._sets[key] = self.trigger.apply(x[y != self.target], test=True)
        return self._sets[key]


@dataclass(frozen=True)
class BlindSignals:
    """How the blind signals of a defense run are computed (set from its DefenseConfig by the method dispatch)."""

    eps: float
    steps: int
    step_size: float
    images: int
    seed: int
    canary: Canary | None = None
    # The weights last evaluated and their signals, per split. The final evaluation of a defense re-evaluates the
    # weights of its last report, and PGD's input gradients need not be bit-reproducible on a GPU: handing back
    # the memo for equal weights keeps final_result from seeing a difference that is not there (and saves one
    # PGD); the test split, which only the final evaluation measures, is added to the memo of those weights.
    _memo: dict = field(default_factory=dict, compare=False, repr=False)


def dataset_eps(info: Any) -> float:
    """The dataset's adversarial-concentration radius (a cached backdoor's is brought up to the declared one when
    it is loaded: methods.attacks.base.Backdoor.load)."""
    return float(getattr(info, "adv_concentration_eps", DEFAULT_EPS))


def default_signals(info: Any) -> BlindSignals:
    """What a defense run reports when its config did not say (the DefenseConfig defaults)."""
    eps = dataset_eps(info)
    return BlindSignals(eps=eps, steps=3, step_size=eps / 2, images=128, seed=0)


def subsample(n: int, images: int, seed: int) -> torch.Tensor:
    """A fixed subsample of `images` of n indices, drawn with its own seed on the CPU (the same on every device)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[: min(images, n)].sort().values


def adv_concentration(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, signals: BlindSignals, batch_size: int = 1024
) -> float:
    """Share of the PGD examples of a fixed subsample of (x, y) that the model puts in its most frequent class."""
    if len(y) == 0:
        return float("nan")
    idx = subsample(len(y), signals.images, signals.seed).to(y.device)
    g = torch.Generator(device=x_uint8.device).manual_seed(int(signals.seed))
    preds = []
    # enable_grad: a method may evaluate inside its own no_grad block; PGD needs the input's gradient
    with torch.enable_grad():
        for start in range(0, len(idx), batch_size):
            batch = idx[start : start + batch_size]
            x_adv = pgd_untargeted(
                model,
                to_float(x_uint8[batch]),
                y[batch],
                signals.eps,
                signals.step_size,
                signals.steps,
                random_start=True,
                clamp=True,
                generator=g,
            )
            was_training = model.training
            model.eval()
            with torch.no_grad():
                preds.append(model(x_adv).argmax(1))
            model.train(was_training)
    counts = torch.bincount(torch.cat(preds))
    return counts.max().item() / len(idx)


# Training images label_excess reads: enough for the poisoned share of a target label to show (about 500
# poisoned among 5,000 at 10%), few enough that a CIFAR-sized training set costs one small inference pass a report.
LABEL_EXCESS_IMAGES = 5000


def label_excess(
    train_predicted: torch.Tensor,
    train_labels: torch.Tensor,
    held_out_predicted: torch.Tensor,
    held_out_labels: torch.Tensor,
    num_classes: int,
) -> float:
    """The largest, over the labels, of the share of the training images carrying a label that the model does not
    predict as it, minus the held-out error of that class. A label no held-out image has counts its whole share;
    a label no training image carries is skipped."""
    excess = []
    for label in range(num_classes):
        carried = train_labels == label
        if not bool(carried.any()):
            continue
        flipped = (train_predicted[carried] != label).float().mean()
        in_class = held_out_labels == label
        error = (held_out_predicted[in_class] != label).float().mean() if bool(in_class.any()) else 0.0
        excess.append(float(flipped - error))
    return max(excess)


def training_predictions(
    model: nn.Module, data: Any, signals: BlindSignals, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted, labels) of the model on label_excess's fixed subsample of the training set."""
    idx = subsample(len(data.y_train), LABEL_EXCESS_IMAGES, signals.seed).to(data.y_train.device)
    return predict_logits(model, data.x_train[idx], batch_size).argmax(1), data.y_train[idx]


def training_label_excess(
    model: nn.Module, data: Any, split: str, batch_size: int, training: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """label_excess of the model's `training` predictions (training_predictions) against the clean `split`."""
    x, y = data.clean_set(split)
    held_out_predicted = predict_logits(model, x, batch_size).argmax(1)
    return label_excess(*training, held_out_predicted, y, data.info.num_classes)


def canary_asr(
    model: nn.Module, canary: Canary, split: str, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> float:
    """Fraction of the canary-stamped images (canary target class excluded) classified as the canary target."""
    stamped = canary.stamped(split, x, y)
    if len(stamped) == 0:
        return float("nan")
    pred = predict_logits(model, stamped, batch_size).argmax(1)
    return accuracy(pred, torch.full_like(pred, canary.target))


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _split_signals(
    model: nn.Module, data: Any, signals: BlindSignals, split: str, batch_size: int, memo: dict
) -> dict[str, float]:
    x, y = data.clean_set(split)
    # the training-set pass is the costliest part (up to LABEL_EXCESS_IMAGES images) and the same for every split
    if "training" not in memo:
        memo["training"] = training_predictions(model, data, signals, batch_size)
    out = {
        f"{split}_adv_concentration": adv_concentration(model, x, y, signals, batch_size),
        f"{split}_label_excess": training_label_excess(model, data, split, batch_size, memo["training"]),
    }
    if signals.canary is not None:
        out[f"{split}_canary_asr"] = canary_asr(model, signals.canary, split, x, y, batch_size)
    return out


def blind_signals(
    model: nn.Module,
    data: Any,
    signals: BlindSignals | None = None,
    batch_size: int = 1024,
    splits: tuple[str, ...] = SPLITS,
) -> dict[str, float]:
    """`<split>_adv_concentration` for each of `splits`, and `<split>_canary_asr` when a canary was planted."""
    signals = signals or default_signals(data.info)
    bare = unwrap(model)  # fp32 and no autocast, as methods.attacks.base.evaluate
    state = bare.state_dict()
    memo = signals._memo
    same = (
        memo and memo["keys"] == list(state) and all(_same_tensor(a, b) for a, b in zip(memo["state"], state.values()))
    )
    if not same:
        memo.clear()  # everything in it belongs to the weights it was computed for
        memo.update(keys=list(state), state=[v.detach().clone() for v in state.values()], out={})
    # per split: the step reports evaluate val only and the final evaluation adds test for the same weights
    for split in splits:
        if split not in memo["out"]:
            memo["out"][split] = _split_signals(bare, data, signals, split, batch_size, memo)
    return {k: v for split in splits for k, v in memo["out"][split].items()}
