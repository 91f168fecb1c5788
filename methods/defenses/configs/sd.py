"""The sd defense's config, declared as a method (its run: methods/defenses/sd.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import choice, ranged
from methods.core.method import declare_method
from methods.defenses.configs.shared import DefenseConfig

FCT_TRANSFORMS = ("rotate_affine", "rotate", "affine", "flip", "crop", "blur", "erase")
FCT_RESAMPLES = ("nearest", "bilinear")


FCT_MODELS = ("short", "backdoored")


# SD's returned model is the short model trained from scratch, or with fct_model backdoored the suspect one.
@declare_method("sd", kind="defense", splits_samples=True, from_scratch=lambda cfg: cfg.fct_model == "short")
@dataclass
class SDConfig(DefenseConfig):
    fct_model: str = choice(
        "short", FCT_MODELS, "score with the short no-augmentation model (paper) or the backdoored one"
    )
    sd_pretrain_epochs: int = ranged(2, 1, 1000, "epochs of no-augmentation training (fct_model short)")
    sd_pretrain_lr: float = ranged(0.01, 0.0, 10.0, "SGD lr of the short training and the centroid fine-tuning")
    sd_cosine_t_max: int = ranged(100, 1, 100_000, "T_max of SD's cosine schedule (100: the lr barely decays)")
    sd_ft_epochs: int = ranged(10, 0, 1000, "epochs of centroid-separation fine-tuning (0 disables it)")
    sd_batch_size: int = ranged(128, 1, 65_536)
    momentum: float = ranged(0.9, 0.0, 1.0)
    weight_decay: float = ranged(5e-4, 0.0, 1.0)
    fct_transform: str = choice("rotate_affine", FCT_TRANSFORMS, "tau of the FCT score")
    fct_rotation_deg: float = ranged(180.0, 0.0, 180.0, "rotation range of rotate / rotate_affine")
    fct_translate: float = ranged(0.2, 0.0, 0.5, "translation range (fraction of the size) of affine / rotate_affine")
    fct_resample: str = choice(
        "nearest",
        FCT_RESAMPLES,
        "resampling of rotate / affine / rotate_affine: nearest with whole-pixel shifts as "
        "the official code, or bdo's earlier bilinear with fractional shifts",
    )
    fct_crop_pad: int | None = ranged(None, 0, 64, "padding of the crop transform (default: the dataset's)")
    fct_blur_kernel: int = ranged(15, 1, 63, "odd kernel size of the blur transform")
    fct_blur_sigma_min: float = ranged(0.1, 0.01, 10.0)
    fct_blur_sigma_max: float = ranged(2.0, 0.01, 10.0)
    fct_erase_scale_min: float = ranged(0.2, 0.0, 1.0, "erased area fraction, lower end")
    fct_erase_scale_max: float = ranged(0.3, 0.0, 1.0, "erased area fraction, upper end")
    fct_n_draws: int = ranged(1, 1, 100, "transformation draws averaged per sample")
    alpha_c: float = ranged(0.2, 0.0, 1.0, "fraction of lowest-FCT samples put in the clean pool")
    alpha_p: float = ranged(0.05, 0.0, 1.0, "fraction of highest-FCT samples put in the poisoned pool")
    split_rescore: bool = False  # True: the code's second FCT pass against the first pass's thresholds

    def validate(self) -> None:
        if self.alpha_c + self.alpha_p > 1.0:
            raise ValueError(f"alpha_c + alpha_p: {self.alpha_c} + {self.alpha_p} exceeds 1 (the pools would overlap)")
        if self.fct_blur_kernel % 2 == 0:
            raise ValueError(f"fct_blur_kernel: {self.fct_blur_kernel} must be odd")
        if self.fct_blur_sigma_min > self.fct_blur_sigma_max:
            raise ValueError("fct_blur_sigma_min: must not exceed fct_blur_sigma_max")
        if self.fct_erase_scale_min > self.fct_erase_scale_max:
            raise ValueError("fct_erase_scale_min: must not exceed fct_erase_scale_max")
