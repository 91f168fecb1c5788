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

The fine-tuning stage itself lives in methods/defenses/_distill.py, where NAD and ARGD build their teachers from it.
"""
from __future__ import annotations

from methods.core.context import RunContext
from methods.core.engine import Engine
from methods.core.method import register_method
from methods.core.training import derive_seed, make_generator, sgd
from methods.defenses._distill import finetune_stage
from methods.defenses.common import clean_subset, final_result
from methods.defenses.configs import FTConfig


@register_method("ft")
def run(ctx: RunContext, cfg: FTConfig):
    backdoor = ctx.backdoor().to(ctx.device)
    data = backdoor.data
    idx = clean_subset(backdoor, cfg.clean_ratio, cfg.clean_seed)
    model = backdoor.build_model(ctx.device)
    optimizer = sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    g = make_generator(derive_seed(cfg.seed, "train"), ctx.device)
    engine = Engine(ctx)
    stage = finetune_stage(engine, backdoor, "finetune", 0, model, optimizer, data.x_train[idx], data.y_train[idx], g,
                           cfg.epochs, cfg.batch_size, cfg.cutout_length, lambda epoch: cfg.lr, cfg.eval_batch_size)
    return final_result(ctx, model, backdoor, engine.run([stage]), batch_size=cfg.eval_batch_size)
