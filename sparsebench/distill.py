"""Retraining that also learns from a dense model (``trainer.distill``): knowledge
distillation (Hinton et al. 2015) with the network's own dense weights as the teacher, or
another run's dense model (``trainer.teacher``, any network on the same data).

The pruned or quantized student is pulled toward the dense model's softened outputs as well as
the labels, so retraining has a target that carries what the dense weights knew about every
class, not only the right one.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Distillation:
    """``(1 - weight) * task(logits, y) + weight * T^2 * KL(teacher_T || student_T)``.

    The teacher is frozen in eval mode (BatchNorm on its running statistics); ``compile_mode``
    compiles its forward like the student's (``reduce-overhead``: replayed as a CUDA graph).
    The T^2 keeps the soft term's gradients on the scale of the hard one's at any temperature.
    """

    def __init__(
        self, teacher: nn.Module, weight: float, temperature: float, task: nn.Module, compile_mode: Optional[str] = None
    ):
        self.teacher = teacher.eval().requires_grad_(False)
        self.forward = torch.compile(self.teacher, mode=compile_mode, dynamic=False) if compile_mode else self.teacher
        self.weight, self.temperature, self.task = weight, temperature, task

    def __call__(self, logits: Tensor, y: Tensor, x: Tensor) -> Tensor:
        t = self.temperature
        with torch.no_grad():
            target = F.log_softmax(self.forward(x).float() / t, dim=1)
        soft = F.kl_div(F.log_softmax(logits.float() / t, dim=1), target, log_target=True, reduction="batchmean")
        return (1 - self.weight) * self.task(logits, y) + self.weight * t * t * soft
