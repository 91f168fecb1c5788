"""Every attack's config, declared as a method: torch-free, so a config is validated without importing torch.

The config of an attack lives here, its run in methods/attacks/<name>.py (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import Config, choice, ranged
from methods.core.method import declare_method

LABEL_MODES = ("all2one", "all2all", "cleanLabel")


# default: D-BR's counts (all2one: rate x non-target images, all2all: rate x N, cleanLabel: rate x target class);
# bernoulli: ASD's independent draw per candidate; uniform: PBE/NAD's rate x N over all images.
POISON_INDEX_MODES = ("default", "bernoulli", "uniform")


@dataclass
class AttackConfig(Config):
    dataset: str = "digits"
    model: str = "small_cnn"
    target: int = ranged(0, 0, None, "target class (all2one, cleanLabel)")
    label_mode: str = choice("all2one", LABEL_MODES)
    poison_rate: float = ranged(0.1, 0.0, 1.0, "fraction of candidates poisoned (see poison_index_mode)")
    poison_index_mode: str = choice("default", POISON_INDEX_MODES)
    seed: int = ranged(0, 0, None, "derives the split, poison, train and clean seeds unless those are set")
    split_seed: int | None = ranged(None, 0, None)
    poison_seed: int | None = ranged(None, 0, None)
    train_seed: int | None = ranged(None, 0, None)
    clean_seed: int | None = ranged(None, 0, None, "clean-subset draws of defenses built on this attack")
    epochs: int = ranged(100, 1, 10_000)
    batch_size: int = ranged(128, 1, 65_536)
    lr: float = ranged(0.01, 0.0, 10.0)
    momentum: float = ranged(0.9, 0.0, 1.0)
    weight_decay: float = ranged(5e-4, 0.0, 1.0)
    augment: bool = True
    eval_batch_size: int = ranged(1024, 1, 1_000_000)

    def seeds(self) -> dict[str, int]:
        from methods.core.training import resolve_seed

        return {
            "split_seed": resolve_seed(self.seed, "split", self.split_seed),
            "poison_seed": resolve_seed(self.seed, "poison", self.poison_seed),
            "train_seed": resolve_seed(self.seed, "train", self.train_seed),
            "clean_seed": resolve_seed(self.seed, "clean", self.clean_seed),
        }

    def departures_from_papers(self) -> list[str] | None:
        """Where this configuration leaves the range its papers evaluated, one phrase each ([] when inside it);
        None for an attack without a declared range. A run outside it is reported (`papers_regime` 0) and its
        table row marked, because results there describe another attack than the one the papers measured."""
        return None

    def validate(self) -> None:
        from methods.data.configs import DATASET_INFOS
        from methods.models.names import MODEL_NAMES

        if self.dataset not in DATASET_INFOS:
            raise ValueError(f"dataset: unknown {self.dataset!r}; known: {', '.join(DATASET_INFOS.names())}")
        if self.model not in MODEL_NAMES:
            raise ValueError(f"model: unknown {self.model!r}; known: {', '.join(MODEL_NAMES)}")


# The clean-label attacks' papers' range: at most half the target class poisoned, a test trigger at most 1.5x
# the training one (SIG's 60 against 40), CL's PGD radius at most 16/255.
MAX_CLASS_FRACTION, MAX_TEST_STRENGTH, MAX_CL_PGD_EPS = 0.5, 1.5, 16 / 255


def clean_label_departures(cfg: AttackConfig) -> list[str]:
    # Only a clean-label attack's rate is a share of the target class. SIG with changed labels is not a
    # departure: it is the PBE code's dirty-label SIG (docs/methods.md#sig).
    departures = []
    if cfg.label_mode == "cleanLabel" and cfg.poison_rate > MAX_CLASS_FRACTION:
        departures.append(
            f"poisons {cfg.poison_rate:.0%} of the target class (papers: 10%, at most {MAX_CLASS_FRACTION:.0%})"
        )
    return departures


@declare_method("badnets", kind="attack")
@dataclass
class BadNetsConfig(AttackConfig):
    pattern: str = choice("grid", ("grid", "square", "four_corner", "file"))
    patch_file: str | None = None
    patch_size: int = ranged(3, 1, 64, "side of the `file` patch in pixels")

    def validate(self) -> None:
        super().validate()
        if self.pattern == "file" and not self.patch_file:
            raise ValueError("patch_file: required when pattern is 'file'")
        if self.patch_file and self.pattern != "file":  # any other pattern never reads it: the file would be ignored
            raise ValueError(f"patch_file: read only by pattern 'file', not {self.pattern!r}; set pattern=file too")


@declare_method("blend", kind="attack")
@dataclass
class BlendConfig(AttackConfig):
    pattern: str = choice("random", ("random", "stripe", "noise", "file"))
    pattern_file: str | None = None
    alpha: float = ranged(0.2, 0.0, 1.0, "blend weight of the pattern in poisoned training images")
    alpha_test: float | None = ranged(None, 0.0, 1.0, "blend weight at evaluation (default: alpha)")

    def validate(self) -> None:
        super().validate()
        if self.pattern == "file" and not self.pattern_file:
            raise ValueError("pattern_file: required when pattern is 'file'")
        if self.pattern_file and self.pattern != "file":  # any other pattern never reads it: the file would be ignored
            raise ValueError(f"pattern_file: read only by pattern 'file', not {self.pattern!r}; set pattern=file too")


@declare_method("sig", kind="attack")
@dataclass
class SIGConfig(AttackConfig):
    label_mode: str = choice("cleanLabel", LABEL_MODES)
    amplitude: float = ranged(40.0, 0.0, 255.0, "D when poisoning training images")
    amplitude_test: float = ranged(60.0, 0.0, 255.0, "D on evaluation images")
    frequency: float = ranged(6.0, 0.0, 64.0)

    def departures_from_papers(self) -> list[str]:
        # Barni et al. and the D-BR code poison 10% of the target class, keep labels, and test at 60 against 40;
        # the tuning ranges reach half the class.
        departures = clean_label_departures(self)
        if self.amplitude_test > MAX_TEST_STRENGTH * self.amplitude:
            departures.append(
                f"test amplitude {self.amplitude_test:g} is more than {MAX_TEST_STRENGTH:g}x the "
                f"training amplitude {self.amplitude:g} (papers: 60 against 40)"
            )
        return departures


@declare_method("trojan", kind="attack")
@dataclass
class TrojanConfig(AttackConfig):
    pass


@declare_method("wanet", kind="attack")
@dataclass
class WaNetConfig(AttackConfig):
    k: int = ranged(4, 2, 64, "control grid size")
    s: float = ranged(0.5, 0.0, 10.0, "warping strength")
    grid_rescale: float = ranged(1.0, 0.0, 2.0)
    cross_ratio: float = ranged(2.0, 0.0, 10.0, "noise-mode images per poisoned image")
    rotation_deg: float = ranged(10.0, 0.0, 180.0, "training rotation range in degrees; 0 turns rotation off")


@declare_method("cl", kind="attack")
@dataclass
class CLConfig(AttackConfig):
    label_mode: str = choice("cleanLabel", LABEL_MODES)
    pgd_eps: float = ranged(8 / 255, 0.0, 1.0)
    pgd_step_size: float = ranged(2 / 255, 0.0, 1.0)
    pgd_steps: int = ranged(4, 0, 1000)
    clean_epochs: int | None = ranged(None, 1, 10_000, "epochs of the clean model (default: epochs)")
    trigger_amplitude: float = ranged(
        1.0,
        0.0,
        1.0,
        "share of the trigger's contrast stamped on poisoned training images; evaluation always stamps the full "
        "trigger (Turner et al.'s reduced-amplitude variant, BackdoorBench's reduced_amplitude)",
    )

    def departures_from_papers(self) -> list[str]:
        # Turner et al. and the D-BR code: 10% of the target class, PGD 8/255 (16/255 in the ablations), the full
        # trigger; the reduced-amplitude variant is a stronger test trigger than the training one.
        departures = clean_label_departures(self)
        if 255 * self.pgd_eps > 255 * MAX_CL_PGD_EPS + 1e-3:  # YAML files write 16/255 to a few digits
            departures.append(f"PGD radius {255 * self.pgd_eps:.0f}/255 is above the papers' 16/255")
        if self.trigger_amplitude * MAX_TEST_STRENGTH < 1.0:
            departures.append(
                f"training triggers at {self.trigger_amplitude:g} of the test trigger's contrast: "
                f"the test trigger is more than {MAX_TEST_STRENGTH:g}x stronger"
            )
        return departures

    def validate(self) -> None:
        super().validate()
        if self.label_mode != "cleanLabel":
            raise ValueError("label_mode: CL is a clean-label attack; only 'cleanLabel' is allowed")
