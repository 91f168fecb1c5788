"""The configs several defenses share: DefenseConfig (every defense), DistillConfig (NAD and ARGD) and
AdversarialFinetuneConfig (AFT and PBE). Torch-free, like every module of this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from methods.core.config import Config, choice, listed, ranged
from methods.core.knowledge import BLIND, KNOWLEDGE_LEVELS, ORACLE
from methods.core.schedules import scaled_steps, stepped_lr

# The canary's trigger patterns (methods/defenses/shared/canary.py): `cross` sits where no attack of this project puts
# its trigger; `grid` is BadNets' own corner patch, which a run against BadNets refuses.
CANARY_TRIGGERS = ("cross", "grid")


@dataclass
class DefenseConfig(Config):
    seed: int = ranged(0, 0, None, "training seed of the defense")
    clean_seed: int | None = ranged(None, 0, None, "clean-subset seed (default: the attack's recorded clean_seed)")
    eval_batch_size: int = ranged(1024, 1, 1_000_000)
    # What the defense's own choices may read (methods/core/knowledge.py): under blind, a choice made inside the
    # method (which round to keep, whether a step failed) reads neither the trigger nor the poison flags. The
    # orchestrator sets it from the sweep's level; a rule left unset follows it, an oracle rule set under blind
    # is refused by validate().
    knowledge: str = choice(ORACLE, KNOWLEDGE_LEVELS, "what in-method choices may know: oracle or blind")
    # The blind adversarial-concentration signal every defense reports (methods/core/blind_signals.py). It reads
    # the weights only, so these settings change no other number a run reports.
    blind_adv_eps: float | None = ranged(
        None, 0.0, 1.0, "PGD radius of val/test_adv_concentration (None: the dataset's)"
    )
    # 3 steps of radius / 2 on 128 images: on digits the separation of a backdoored from a clean model is the
    # same as with 5 or 10 steps and 256 images (docs/methods.md#blind-signals), at a third of the cost
    blind_adv_steps: int = ranged(3, 1, 1000, "PGD iterations of the adversarial concentration")
    blind_adv_step_size: float | None = ranged(None, 0.0, 1.0, "its PGD step (None: radius / 2)")
    blind_adv_images: int = ranged(128, 1, 1_000_000, "clean images attacked per split (a fixed subsample)")
    blind_adv_seed: int = ranged(0, 0, None, "seed of that subsample and of the PGD random start")
    # The canary (methods/defenses/shared/canary.py): the defender's own backdoor, planted before the defense, whose
    # ASR after it (val/test_canary_asr) is a blind sign of how well the defense removes a backdoor. Opt-in: it
    # changes what the defense starts from. A defense that trains from scratch gets canary_rate of the training
    # set stamped and relabelled; one that repairs the suspect model gets that model fine-tuned first on its
    # clean extra set with canary_rate of it stamped.
    canary_rate: float = ranged(0.0, 0.0, 1.0, "fraction of the images trained on that carry the canary (0: off)")
    canary_target: int | None = ranged(None, 0, None, "the canary's class (None: the attack's target + 1)")
    canary_trigger: str = choice("cross", CANARY_TRIGGERS, "the canary's trigger pattern")
    # The planting fine-tune is gentle: on digits (rate 0.1 of 10% clean images) 20 epochs at lr 0.003 plant the
    # canary (val canary ASR 1.0) and keep the suspect model (val ACC 0.98, ASR 0.98); lr 0.01 already plays FT's
    # part and removes much of the attacker's backdoor before the defense begins.
    canary_epochs: int = ranged(20, 1, 10_000, "repairing defenses: epochs of the fine-tuning that plants it")
    canary_lr: float = ranged(0.003, 0.0, 10.0, "repairing defenses: lr of that fine-tuning")
    canary_clean_ratio: float = ranged(
        0.1, 1e-4, 1.0, "repairing defenses: clean training images that fine-tuning uses"
    )
    # The fields whose rule, left unset, follows `knowledge`: the only way the level changes what a run trains.
    # A defense without any trains the same under both levels, so a study comparing them runs its trials once.
    KNOWLEDGE_RULES: ClassVar[tuple[str, ...]] = ()

    def refuse_oracle_rule(self, field: str, oracle_rules: tuple[str, ...]) -> None:
        """An explicitly chosen rule that reads oracle metrics contradicts knowledge blind."""
        value = getattr(self, field)
        if self.knowledge == BLIND and value in oracle_rules:
            raise ValueError(
                f"{field}: {value} reads the trigger or the poison flags, which knowledge: blind refuses; "
                f"leave {field} unset or choose a blind rule"
            )


@dataclass
class DistillConfig(DefenseConfig):
    """Fields NAD and ARGD share. `lr_step_epochs` are given for the method's paper schedule length
    (REFERENCE_EPOCHS) and scaled to `epochs`; at each the lr becomes lr times the matching `lr_steps` factor."""

    REFERENCE_EPOCHS = 10

    clean_ratio: float = ranged(0.05, 1e-4, 1.0, "fraction of the training set available as clean data")
    epochs: int = ranged(10, 1, 10_000, "distillation epochs")
    lr: float = ranged(0.1, 0.0, 10.0, "initial distillation lr")
    lr_steps: list[float] = listed([0.1, 0.01], 0.0, 10.0, "lr factors from each step epoch on")
    lr_step_epochs: list[int] = listed([3, 6], 1, None, "step epochs of the paper schedule, scaled to epochs")
    batch_size: int = ranged(64, 2, 65_536)
    momentum: float = ranged(0.9, 0.0, 1.0)
    weight_decay: float = ranged(1e-4, 0.0, 1.0)
    nesterov: bool = True
    p: float = ranged(2.0, 0.5, 8.0, "attention-map power")
    cutout_length: int = ranged(3, 0, 64, "Cutout side (half-length floored: 3 cuts 2 x 2); 0 disables it")
    teacher_epochs: int = ranged(10, 1, 10_000, "CE training epochs of the teacher")

    def validate(self) -> None:
        if len(self.lr_steps) != len(self.lr_step_epochs):
            raise ValueError(
                f"lr_steps: {len(self.lr_steps)} factors for {len(self.lr_step_epochs)} lr_step_epochs; "
                "give one factor per step epoch"
            )
        if any(b <= a for a, b in zip(self.lr_step_epochs, self.lr_step_epochs[1:])):
            raise ValueError(f"lr_step_epochs: must be strictly increasing, got {self.lr_step_epochs}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: needs momentum > 0")

    def student_lr(self, epoch: int) -> float:
        steps = scaled_steps(self.lr_step_epochs, self.REFERENCE_EPOCHS, self.epochs)
        return stepped_lr(self.lr, self.lr_steps, steps, epoch)


@dataclass
class AdversarialFinetuneConfig(DefenseConfig):
    """PGD and fine-tuning settings shared by AFT and PBE (docs/methods.md#aft)."""

    adv_eps: float = ranged(6 / 255, 0.0, 1.0, "L-inf radius of the PGD examples, in [0, 1] pixel units")
    adv_steps: int = ranged(7, 1, 1000, "PGD iterations")
    adv_step_size: float | None = ranged(None, 0.0, 1.0, "PGD step in pixel units (default adv_eps / 5, as the code)")
    adv_random_start: bool = True
    adv_clamp: bool = True
    lr: float = ranged(1e-3, 0.0, 10.0, "constant SGD learning rate")
    momentum: float = ranged(0.9, 0.0, 1.0)
    weight_decay: float = ranged(5e-4, 0.0, 1.0)
    batch_size: int = ranged(128, 1, 65_536)

    def step_size(self) -> float:
        return self.adv_eps / 5 if self.adv_step_size is None else self.adv_step_size
