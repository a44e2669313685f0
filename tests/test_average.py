"""trainer.ema_decay: dense training ends with the exponential moving average of its weights."""

from types import SimpleNamespace

import pytest
import torch

from sparsebench.average import WeightAverage
from sparsebench.train import TrainHook, evaluate, fit
from tests.conftest import compose
from tests.test_prune import _digits_batches, convnet


class Recorder(TrainHook):
    """Every parameter and BatchNorm statistic at the start and after every optimizer step."""

    def __init__(self):
        self.states = []

    def on_fit_start(self, model, steps_per_epoch, total_steps):
        self.after_step(0, model)

    def after_step(self, step, model):
        self.states.append({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})


def test_the_dense_model_ends_as_the_moving_average_of_its_steps(tmp_path):
    train, test = _digits_batches()
    model = convnet()
    cfg = SimpleNamespace(
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="cosine",
        label_smoothing=0.0,
        amp=False,
        compile=False,
        compile_mode="default",
        progress=False,
        checkpoint_every=0,
        checkpoint_epochs=1,
        eval_every=1,
    )
    recorder, decay = Recorder(), 0.9
    logged = []
    fit(
        model,
        train,
        test,
        cfg,
        phase="dense",
        epochs=2,
        lr=cfg.lr,
        hooks=[recorder, WeightAverage(decay, test, "dense")],
        checkpoint=tmp_path / "c.pt",
        log=lambda m, s: logged.append(m),
    )
    expected = dict(recorder.states[0])  # the model as training starts
    for n, state in enumerate(recorder.states[1:]):
        d = min(decay, (1 + n) / (10 + n))  # the warm-up: early steps weigh more
        expected = {k: torch.lerp(expected[k], state[k], 1 - d) for k in expected}
    final = model.state_dict()
    assert all(torch.allclose(final[k], expected[k], atol=1e-6) for k in expected)
    assert not torch.allclose(final["block1.bn.running_mean"], recorder.states[-1]["block1.bn.running_mean"])
    # Each epoch logs both accuracies; the model kept is the average whose accuracy was logged last.
    epochs = [m for m in logged if "dense/acc_ema" in m]
    assert len(epochs) == 2 and all(0.1 < m["dense/acc"] <= 1 and 0.1 < m["dense/acc_ema"] <= 1 for m in epochs)
    assert evaluate(model, test) == epochs[-1]["dense/acc_ema"]


def test_eval_every_tests_the_model_and_its_average_at_every_nth_epoch_and_the_last(tmp_path):
    train, test = _digits_batches()
    cfg = SimpleNamespace(
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        scheduler="cosine",
        label_smoothing=0.0,
        amp=False,
        compile=False,
        compile_mode="default",
        progress=False,
        checkpoint_every=0,
        checkpoint_epochs=1,
        eval_every=2,
    )
    logged = []
    metrics = fit(
        convnet(),
        train,
        test,
        cfg,
        phase="dense",
        epochs=5,
        lr=cfg.lr,
        hooks=[WeightAverage(0.9, test, "dense")],
        checkpoint=tmp_path / "c.pt",
        log=lambda m, s: logged.append(m),
    )
    epochs = [m for m in logged if "dense/epoch" in m]
    assert [m["dense/epoch"] for m in epochs] == [1, 2, 3, 4, 5]  # every epoch logs its time
    assert [m["dense/epoch"] for m in epochs if "dense/acc" in m] == [2, 4, 5]
    assert [m["dense/epoch"] for m in epochs if "dense/acc_ema" in m] == [2, 4, 5]
    assert metrics["dense/acc"] > 0.5 and metrics["dense/epoch"] == 5  # fit returns the last, tested epoch


def test_eval_every_below_one_is_refused():
    from sparsebench.config import validate

    with pytest.raises(ValueError, match="trainer.eval_every=0 is not allowed: an integer >= 1"):
        validate(compose("trainer.eval_every=0"))


def test_a_short_run_with_a_slow_average_still_ends_trained(tmp_path):
    # 69 steps at decay 0.9995: without the warm-up the average would stay 97% the random init.
    from sparsebench.experiment import run
    from tests.conftest import DENSE

    metrics = run(compose(*DENSE, "trainer.epochs=3", "trainer.ema_decay=0.9995"), tmp_path)
    assert metrics["status"] == "ok" and metrics["acc_dense"] > 0.8


def test_ema_decay_outside_zero_one_is_refused():
    from sparsebench.config import validate

    with pytest.raises(ValueError, match="trainer.ema_decay=1.0 is not allowed: null or a number in \\(0, 1\\)"):
        validate(compose("trainer.ema_decay=1.0"))
