"""The two per-image costs that dominate some defenses, each against plain training/evaluation of the same
model on the same images:

- PGD (AFT's and PBE's cost): untargeted L-inf PGD-k images per second (methods.core.pgd.pgd_untargeted,
  eps 8/255, step 2/255) against SGD training steps per image on the same batches;
- FCT scoring (SD's cost): feature-consistency scores per second (methods.defenses.sd.fct_scores with SD's
  default rotate+translate transform) against plain evaluation (predict_logits) of the same images.

Weights are freshly initialised: the cost does not depend on what the model learned.
"""

from __future__ import annotations

import math

from benchmarks.common import BenchContext, Row, repeat_rate

BATCH = 128  # the PGD/fine-tuning batch of AFT/PBE-style loops
EVAL_BATCH = 1024


def _setup(ctx: BenchContext, model_name: str):
    import torch

    import methods  # noqa: F401
    from methods.data.embedded import SYNTHETIC_INFO, synthetic_images
    from methods.models.base import build_model

    torch.manual_seed(0)
    device = ctx.torch_device()
    model = build_model(model_name, SYNTHETIC_INFO).to(device)
    x, y = synthetic_images(ctx.sizes.adv_images, seed=3)
    return model, x.to(device), y.to(device), device


def bench_pgd(ctx: BenchContext, model_name: str) -> list[Row]:
    import torch.nn.functional as F

    from methods.core.pgd import pgd_untargeted
    from methods.core.training import make_generator, sgd, to_float

    sizes = ctx.sizes
    model, x, y, device = _setup(ctx, model_name)
    g = make_generator(0, device)
    batches = [(to_float(x[i : i + BATCH]), y[i : i + BATCH]) for i in range(0, len(y), BATCH)]
    steps = sizes.pgd_steps

    def attack() -> None:
        for xb, yb in batches:
            pgd_untargeted(model, xb, yb, eps=8 / 255, step_size=2 / 255, steps=steps, generator=g)

    optimizer = sgd(model.parameters(), lr=0.01)

    def train() -> None:
        model.train()
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    ctx.probe.reset()
    ctx.log(f"pgd.{model_name}: PGD-{steps} over {len(y)} images x {sizes.adv_reps}")
    pgd_rate, pgd_rates = repeat_rate(attack, len(y), warmup=1, reps=sizes.adv_reps, device=device)
    row = ctx.probe.fill(
        Row(
            name=f"pgd.{model_name}",
            measured=pgd_rate,
            unit="img/s",
            baseline_unit="img/s",
            what=f"PGD-{steps} adversarial images/s vs SGD training images/s, {model_name}, bs {BATCH}",
        )
    )
    ctx.log(f"pgd.{model_name}: training steps")
    train_rate, train_rates = repeat_rate(train, len(y), warmup=1, reps=sizes.adv_reps, device=device)
    row.baseline = train_rate
    row.note = (
        f"one PGD-{steps} image costs {train_rate / pgd_rate:.1f} training images "
        f"(~{steps} forward+backward passes vs 1 plus an SGD step)"
    )
    row.details = {"pgd_rates": pgd_rates, "train_rates": train_rates, "images": len(y), "steps": steps}
    return [row]


def _fct_scorer():
    """SD's public scorer, or (while sd.py is unavailable) the same computation written out."""
    try:
        from methods.defenses.sd import fct_scores

        return fct_scores, "methods.defenses.sd.fct_scores"
    except ImportError:  # pragma: no cover - only before/without SD
        import torch

        from methods.core.training import predict_features, to_float

        @torch.no_grad()
        def fallback(model, x_uint8, transform, g, n_draws=1, batch_size=EVAL_BATCH):
            out = []
            for start in range(0, len(x_uint8), batch_size):
                xb = to_float(x_uint8[start : start + batch_size])
                ref = predict_features(model, xb, batch_size)
                total = torch.zeros(len(xb), device=xb.device)
                for _ in range(n_draws):
                    total += (predict_features(model, transform(xb, g), batch_size) - ref).square().mean(1)
                out.append(total / n_draws)
            return torch.cat(out)

        return fallback, "predict_features of images vs rotated+translated images (SD unavailable)"


def bench_fct(ctx: BenchContext, model_name: str) -> list[Row]:
    from methods.core.training import make_generator, predict_logits
    from methods.data.augment import random_rotate_translate

    sizes = ctx.sizes
    model, x, y, device = _setup(ctx, model_name)
    g = make_generator(0, device)
    scorer, source = _fct_scorer()
    transform = lambda xb, gen: random_rotate_translate(xb, 180.0, 0.2, gen)  # noqa: E731  (SD's default tau)

    ctx.probe.reset()
    ctx.log(f"fct.{model_name}: FCT over {len(y)} images x {sizes.adv_reps}")
    fct_rate, fct_rates = repeat_rate(
        lambda: scorer(model, x, transform, g, 1, EVAL_BATCH), len(y), warmup=1, reps=sizes.adv_reps, device=device
    )
    row = ctx.probe.fill(
        Row(
            name=f"fct.{model_name}",
            measured=fct_rate,
            unit="img/s",
            baseline_unit="img/s",
            what=f"FCT scores/s vs plain evaluation images/s, {model_name}, batch {EVAL_BATCH}",
        )
    )
    eval_rate, eval_rates = repeat_rate(
        lambda: predict_logits(model, x, EVAL_BATCH), len(y), warmup=1, reps=sizes.adv_reps, device=device
    )
    row.baseline = eval_rate
    row.note = f"scorer: {source}; two feature passes plus a warp per image, so ~0.5 is the expectation"
    row.details = {"fct_rates": fct_rates, "eval_rates": eval_rates, "images": len(y)}
    if not math.isfinite(row.ratio):
        row.status = "error"
    return [row]
