"""Fine-tuning (FT): retrain the backdoored model with cross-entropy on a small clean subset of the training data.

The plain baseline of the attention-distillation defenses and the teacher of both: NAD (Li, Lyu, Koren, Lyu, Li,
Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks", ICLR 2021) and ARGD
(Xia, Wang, Ding, Wei, Chen, "Eliminating Backdoor Triggers for Deep Neural Networks Using Attention Relation
Graph Distillation", IJCAI 2022) fine-tune the backdoored model on 5% clean training data with CE for 5-10
epochs (their READMEs; lr 0.01 as docs/methods.md#ft recommends), with the clean pipeline of their code:
random crop, flip where the dataset allows it, and Cutout (length 3, a 2 x 2 hole).

Deviations from the official code: the clean subset is drawn with the attack's recorded clean seed rather than an
unseeded random_split, so teacher and student (and every defense) see the same images; the crop padding and
flip follow the dataset (digits are padded by 2 and never flipped) instead of CIFAR's fixed 4 px and flip.

The fine-tuning stage itself lives in methods/defenses/shared/distill.py, where NAD and ARGD build their teachers
from it.
"""

from __future__ import annotations

from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.training import sgd
from methods.defenses.configs.ft import FTConfig
from methods.defenses.shared.common import DefenseRun
from methods.defenses.shared.distill import finetune_stage


@register_method("ft")
def run(ctx: RunContext, cfg: FTConfig):
    defense = DefenseRun(ctx, cfg)
    idx = defense.clean_subset()
    model = defense.backdoor.build_model(ctx.device)
    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    x, y = defense.data.x_train[idx], defense.data.y_train[idx]
    stage = finetune_stage(
        defense,
        "finetune",
        0,
        model,
        optimizer,
        x,
        y,
        defense.generator("train"),
        cfg.epochs,
        cfg.batch_size,
        lambda _epoch: cfg.lr,
    )
    return defense.finish(model, defense.engine.run([stage]))
