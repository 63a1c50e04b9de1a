"""Knowledge distillation: the train stage's network learns from the ensemble stage's teacher
as well as from the labels (Hinton, Vinyals and Dean 2015, "Distilling the knowledge in a
neural network"). The teacher's logits come precomputed, one per training image
(data/teacher.csv), so distilling costs the training loop nothing but this loss.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from cxr.params import Section


class DistillParams(Section):
    """Knowledge distillation from the ensemble members into the train stage's network. Its own
    section, not part of `train`: the members share `train`, and a change to how train learns
    from them must not retrain them."""

    # best: whichever of the members and their ensemble has the lowest validation log loss
    teacher: Literal["none", "ensemble", "best"]
    temperature: Annotated[float, Field(ge=1, le=20)]
    weight: Annotated[float, Field(ge=0, le=1)]  # the soft targets' share of the loss


class DistillationLoss(nn.Module):
    """Hinton et al.'s knowledge distillation for one logit: (1 - weight) x the label loss +
    weight x T^2 x cross-entropy between the student's and the teacher's probabilities, both
    softened by temperature T. T^2 keeps the soft term's gradients on the scale of the hard
    term's as T changes. Targets are (B, 2): label, teacher logit."""

    def __init__(self, hard: nn.Module, temperature: float, weight: float) -> None:
        super().__init__()
        self.hard, self.temperature, self.weight = hard, temperature, weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        soft = F.binary_cross_entropy_with_logits(logits / t, torch.sigmoid(targets[:, 1] / t))
        return (1 - self.weight) * self.hard(logits, targets[:, 0]) + self.weight * t * t * soft
