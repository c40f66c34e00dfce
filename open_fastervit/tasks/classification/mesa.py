"""MESA: EMA self-distillation used to train FasterViT (timm has no equivalent).

After a fraction of training, the EMA copy of the model becomes a teacher on the same (mixed) batch:
``loss = task_loss + coef * 50 * KL(softmax(teacher / T) || softmax(student / T))`` with T = 3, the KL
divergence summed over classes and averaged over the batch (FasterViT, arXiv 2306.06189, training
recipe; the coefficient per model is in the recipes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MesaLoss", "distillation_kl"]

TEMPERATURE = 3.0
SCALE = 50.0


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Batch-mean KL divergence between temperature-softened teacher and student distributions.

    student, teacher: logits (B, classes) -> scalar. The teacher carries no gradient.
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    p_teacher = F.softmax(teacher.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean")


class MesaLoss(nn.Module):
    """Task loss plus the MESA self-distillation term once ``active`` is set.

    Args:
        criterion: the task loss ``criterion(logits, targets)`` (soft-target CE with mixup).
        coef: MESA coefficient (0.1 ... 5.0 in the published recipes); 0 disables the term.
    """

    def __init__(self, criterion: nn.Module, coef: float) -> None:
        super().__init__()
        if coef < 0:
            raise ValueError(f"MESA coefficient must be >= 0, got {coef}")
        self.criterion = criterion
        self.coef = coef
        self.active = False

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = self.criterion(logits, targets)
        if self.active and self.coef > 0:
            if teacher_logits is None:
                raise ValueError("MESA is active but no teacher (EMA) logits were given")
            loss = loss + self.coef * SCALE * distillation_kl(logits, teacher_logits)
        return loss
