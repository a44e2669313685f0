"""An exponential moving average of the weights during dense training (``trainer.ema_decay``).

A training-loop hook: after every optimizer step it folds the model's parameters and
BatchNorm statistics into an averaged copy (torch.optim.swa_utils, one fused update over
all tensors), logs the copy's accuracy beside the model's at each epoch end, and when
training ends puts the averaged weights into the model, so the dense model saved, shared
and compressed is the average.
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sparsebench.data import Batches
from sparsebench.train import TrainHook, evaluate


class WeightAverage(TrainHook):
    name = "ema"

    def __init__(self, decay: float, test: Batches, phase: str, amp: bool = False):
        self.decay, self.test, self.phase, self.amp = decay, test, phase, amp
        self.average: AveragedModel | None = None

    def on_fit_start(self, model: nn.Module, steps_per_epoch: int, total_steps: int) -> None:
        self.average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    def after_step(self, step: int, model: nn.Module) -> None:
        self.average.update_parameters(model)

    def on_epoch_end(self, epoch: int, model: nn.Module) -> Dict[str, float]:
        return {f"{self.phase}/acc_ema": evaluate(self.average.module, self.test, self.amp)}

    def on_fit_end(self, model: nn.Module) -> None:
        model.load_state_dict(self.average.module.state_dict())

    def state_dict(self) -> Dict[str, Any]:
        return {"average": self.average.state_dict()} if self.average is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            self.average.load_state_dict(state["average"])
