"""The dst defense's config, declared as a method (its run: methods/defenses/dst.py)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.core.config import choice, ranged
from methods.core.method import declare_method
from methods.defenses.configs.sd import SDConfig


@declare_method("dst", kind="defense", splits_samples=True, from_scratch=True)
@dataclass
class DSTConfig(SDConfig):
    st_epochs: int = ranged(200, 1, 100_000, "SupCon epochs")
    st_lr: float = ranged(0.5, 0.0, 100.0, "SupCon SGD lr (peak, after warm-up)")
    st_batch_size: int = ranged(512, 2, 65_536)
    st_weight_decay: float = ranged(1e-4, 0.0, 1.0)
    st_lr_decay: float = ranged(1e-3, 0.0, 1.0, "the cosine ends at st_lr x this (the code's 0.1^3)")
    st_warmup_epochs: int = ranged(10, 0, 100_000, "linear warm-up epochs (0 disables it)")
    st_warmup_from: float = ranged(0.01, 0.0, 100.0, "lr at the start of the warm-up")
    st_supcon_temperature: float = ranged(0.1, 1e-4, 100.0)
    st_base_temperature: float = ranged(0.07, 1e-4, 100.0, "the loss is scaled by T / T_base")
    st_proj_dim: int = ranged(128, 1, 65_536, "output width of the projection MLP")
    st_positive_pool: str = choice(
        "any", ("any", "clean"), "a clean anchor's same-label positives: any pool's views (code) or clean ones"
    )
    st_lambda_p: float = ranged(1e-3, 0.0, 100.0, "weight of the poisoned-pool CE subtracted in the mixed CE")
    st_cls_epochs: int = ranged(10, 1, 100_000)
    st_cls_lr: float = ranged(5.0, 0.0, 1000.0)
    st_cls_batch_size: int = ranged(512, 1, 65_536)
    st_cls_weight_decay: float = ranged(0.0, 0.0, 1.0)
