"""SIG: a clean-label sinusoidal signal (Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set
Corruption Without Label Poisoning", ICIP 2019). Additive, v(i, j) = D sin(2 pi j f / m); as in D-BR and
BackdoorBench (a fix docs/methods.md#sig recommends) the training amplitude is 40 and the test amplitude 60,
clean-label by default."""

from __future__ import annotations

from methods.attacks.base import run_attack
from methods.attacks.configs.sig import SIGConfig
from methods.attacks.triggers import AdditiveTrigger, sig_signal
from methods.core.method import register_method
from methods.data.configs import DatasetInfo


def make_sig_trigger(info: DatasetInfo, cfg: SIGConfig, seed: int) -> AdditiveTrigger:
    c, s = info.channels, info.size
    return AdditiveTrigger(
        {"channels": c, "size": s, "frequency": cfg.frequency},
        {
            "delta": sig_signal(c, s, cfg.amplitude, cfg.frequency),
            "delta_test": sig_signal(c, s, cfg.amplitude_test, cfg.frequency),
        },
    )


@register_method("sig")
def run(ctx, cfg: SIGConfig):
    return run_attack(ctx, "sig", cfg, make_sig_trigger)
