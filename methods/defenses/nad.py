"""NAD: erase a backdoor by distilling a fine-tuned teacher's attention maps into the backdoored model.

Li, Lyu, Koren, Lyu, Li, Ma, "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks",
ICLR 2021 (docs/methods.md#nad). The teacher is the backdoored model fine-tuned with CE on the clean subset
(teacher_epochs at teacher_lr); the student, the backdoored model itself, then trains on the same clean images with
CE + beta1 * AT(g1) + beta2 * AT(g2) + beta3 * AT(g3) on the three stage outputs the model declares, the teacher
frozen in eval mode. SGD with Nesterov momentum 0.9, weight decay 1e-4, batch 64, 20 epochs at lr 0.1 that drops
to 0.01 after epoch 2, betas 500 / 1000 / 1000 and attention power 2, as in the official configuration.

Deviations from the official code: the clean subset is drawn with the recorded clean seed and the same indices
serve teacher and student (the official split is unseeded); the lr step epochs are scaled with `epochs` (given
for the 20-epoch schedule), so shortened or lengthened schedules keep the same shape; the last epoch's model is
kept. The teacher and student stages, which ARGD shares, live in methods/defenses/shared/distill.py.
"""

from __future__ import annotations

import torch.nn.functional as F

from methods.core.context import RunContext
from methods.core.method import register_method
from methods.core.training import sgd
from methods.defenses.configs.nad import NADConfig
from methods.defenses.shared.attention import weighted_at_loss
from methods.defenses.shared.common import DefenseRun
from methods.defenses.shared.distill import distill_stage, teacher_stage


@register_method("nad")
def run(ctx: RunContext, cfg: NADConfig):
    defense = DefenseRun(ctx, cfg)
    idx = defense.clean_subset()
    x, y = defense.data.x_train[idx], defense.data.y_train[idx]
    student, teacher = defense.backdoor.build_model(ctx.device), defense.backdoor.build_model(ctx.device)
    first = teacher_stage(defense, teacher, x, y, lambda _epoch: cfg.teacher_lr)
    optimizer = sgd(student.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    g = defense.generator("train")
    betas = (cfg.beta1, cfg.beta2, cfg.beta3)

    def loss_terms(logits, labels, student_maps, teacher_maps, _):
        return {
            "loss_ce": F.cross_entropy(logits, labels),
            "loss_at": weighted_at_loss(student_maps, teacher_maps, betas),
        }

    stage = distill_stage(defense, student, teacher, optimizer, x, y, g, loss_terms)
    defense.engine.track({"student": student}, {"student": optimizer}, generators={"train": g})
    return defense.finish(student, defense.engine.run([first, stage]))
