"""An exponential moving average of the weights during dense training (``trainer.ema_decay``).

A training-loop hook: after every optimizer step it folds the model's parameters and
BatchNorm statistics into an averaged copy (one fused update over all tensors, no host
sync), logs the copy's accuracy beside the model's whenever the loop scores it, and when training
ends puts the averaged weights into the model, so the dense model saved, shared and
compressed is the average. The decay warms up as (1 + n) / (10 + n) after n updates, so a
short run is not left averaging its random initial weights.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from sparsebench.data import Batches
from sparsebench.train import TrainHook, evaluate


class WeightAverage(TrainHook):
    name = "ema"

    def __init__(self, decay: float, test: Batches, phase: str, amp: bool = False):
        self.decay, self.test, self.phase, self.amp = decay, test, phase, amp
        self.average: Optional[nn.Module] = None
        self.updates = 0
        self._floats: List[List[Tensor]] = [[], []]  # [averaged, model], updated in place together
        self._counters: List[List[Tensor]] = [[], []]  # integer buffers (BatchNorm's batch count): copied

    def on_fit_start(self, model: nn.Module, steps_per_epoch: int, total_steps: int) -> None:
        self.average = copy.deepcopy(model).requires_grad_(False)
        self.updates = 0
        self._floats, self._counters = [[], []], [[], []]
        for averaged, current in zip(self.average.state_dict().values(), model.state_dict().values()):
            kind = self._floats if averaged.is_floating_point() else self._counters
            kind[0].append(averaged)
            kind[1].append(current)

    def after_step(self, step: int, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1 - decay)
        if self._counters[0]:
            torch._foreach_copy_(self._counters[0], self._counters[1])  # one launch, not one per BatchNorm
        self.updates += 1

    def on_evaluate(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        return {f"{self.phase}/acc_ema": evaluate(self.average, self.test, self.amp)}

    def on_fit_end(self, model: nn.Module) -> None:
        model.load_state_dict(self.average.state_dict())

    def state_dict(self) -> Dict[str, Any]:
        return {"average": self.average.state_dict(), "updates": self.updates} if self.average is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.average.load_state_dict(state["average"])  # in place: the tensor lists above stay valid
            self.updates = state["updates"]
