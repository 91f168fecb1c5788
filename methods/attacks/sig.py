"""SIG: a clean-label sinusoidal signal (Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set
Corruption Without Label Poisoning", ICIP 2019). Additive, v(i, j) = D sin(2 pi j f / m); as in D-BR and
BackdoorBench (a fix docs/methods.md#sig recommends) the training amplitude is 40 and the test amplitude 60,
clean-label by default."""
from __future__ import annotations

from dataclasses import dataclass

from methods.attacks.base import LABEL_MODES, AttackConfig, run_attack
from methods.attacks.triggers import AdditiveTrigger, sig_signal
from methods.core.config import choice, ranged
from methods.core.method import register_method
from methods.data.base import DatasetInfo


@dataclass
class SIGConfig(AttackConfig):
    label_mode: str = choice("cleanLabel", LABEL_MODES)
    amplitude: float = ranged(40.0, 0.0, 255.0, "D when poisoning training images")
    amplitude_test: float = ranged(60.0, 0.0, 255.0, "D on evaluation images")
    frequency: float = ranged(6.0, 0.0, 64.0)


def make_sig_trigger(info: DatasetInfo, cfg: SIGConfig, seed: int) -> AdditiveTrigger:
    c, s = info.channels, info.size
    return AdditiveTrigger(
        {"channels": c, "size": s, "frequency": cfg.frequency},
        {"delta": sig_signal(c, s, cfg.amplitude, cfg.frequency),
         "delta_test": sig_signal(c, s, cfg.amplitude_test, cfg.frequency)},
    )


@register_method("sig", kind="attack", config=SIGConfig)
def run(ctx, cfg: SIGConfig):
    return run_attack(ctx, "sig", cfg, make_sig_trigger)
