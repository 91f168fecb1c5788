"""The config every attack shares (AttackConfig) and the clean-label attacks' papers' range (SIG and CL).
Torch-free, like every module of this package.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import Config, choice, ranged

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


def check_pattern_file(pattern: str, file_field: str, file: str | None) -> None:
    """BadNets' and Blend's `file` pattern: it needs its file, and a file given with any other pattern would be
    ignored, so both are refused."""
    if pattern == "file" and not file:
        raise ValueError(f"{file_field}: required when pattern is 'file'")
    if file and pattern != "file":
        raise ValueError(f"{file_field}: read only by pattern 'file', not {pattern!r}; set pattern=file too")


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
