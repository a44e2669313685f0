"""The Python API: a user's module and DataLoaders, compressed, exported, loaded and timed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsebench
from sparsebench.errors import ConfigError
from sparsebench.layers import weight_layers

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Your own network, from Python") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes net.safetensors where it runs
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    model, packed, val = scope["model"], scope["packed"], scope["val"]
    assert sparsebench.accuracy(model, val) > 0.8  # ten noisy patterns: learnt while pruned to 90% and 4-bit
    layers = weight_layers(model)
    second = layers["features.3"].weight
    assert (second == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)  # pruned to the target
    assert (layers["features.0"].weight == 0).float().mean() < 0.2  # the first conv not pruned by default
    per_channel = [len(torch.unique(row)) for row in second.detach().flatten(1)]
    assert max(per_channel) <= 16  # 4-bit codes: at most 16 levels per output channel
    x = scope["images"][:32]
    assert torch.allclose(packed(x), model(x), atol=1e-4)  # the packed network is the compressed one
    network = scope["table"]["network"]
    ours = network["bench/backend"]  # sparse_reference on a CPU, direct_sparse on a GPU
    assert network[f"network_error/{ours}/b1"] < 1e-5
    baseline = "cudnn_fp16" if torch.cuda.is_available() else "torch_cpu"  # the other one is skipped
    assert network[f"speedup/{baseline}/b1"] > 0 and baseline not in network["bench/skipped"]
    assert (tmp_path / "net.safetensors").is_file()
    layer_rows = scope["table"]["layers"]
    assert {r["layer"] for r in layer_rows} == set(layers) and all(r["time_us"] > 0 for r in layer_rows)


class Plain(nn.Module):
    """No BatchNorm and a bias-free linear: nothing folds, and the file holds every weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 4, bias=False)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


QUIET = {"progress": False}


def loaders(n: int = 256):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    x[torch.arange(n), 0, y, y] += 3.0  # a bright pixel on the diagonal says the class
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), DataLoader(TensorDataset(x, y), batch_size=64)


def test_every_layer_can_be_pruned_and_options_reach_the_configs(tmp_path: Path):
    train, val = loaders()
    model = sparsebench.compress(
        Plain(),
        train,
        val,
        prune="oneshot",
        sparsity=0.5,
        quant="kmeans",
        bits=3,
        epochs=2,
        prune_options={"keep_first_dense": False, "keep_last_dense": False},
        trainer_options=QUIET,
    )
    for m in (model.conv, model.fc):
        assert 0.5 <= (m.weight == 0).float().mean().item() < 0.6  # the cut, and k-means levels that land on 0
        assert len(torch.unique(m.weight)) <= 8  # one 3-bit codebook per layer
    facts = sparsebench.export(model, tmp_path / "plain.safetensors")
    assert facts["fc"]["bits"] == 3 and facts["conv"]["nnz"] == model.conv.weight.count_nonzero().item()
    x = next(iter(val))[0]
    loaded = sparsebench.load(tmp_path / "plain.safetensors", Plain())
    assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_a_module_compressed_without_quantization_exports_fp32_values(tmp_path: Path):
    train, _ = loaders()
    model = sparsebench.compress(
        Plain(), train, quant="none", epochs=1, prune_options={"keep_first_dense": False}, trainer_options=QUIET
    )
    facts = sparsebench.export(model, tmp_path / "f.safetensors")
    assert facts["conv"]["bits"] == 32 and facts["conv"]["nnz"] == pytest.approx(0.1 * 72, abs=1)  # pruned, fp32
    assert facts["fc"]["bits"] == 32 and facts["fc"]["nnz"] == model.fc.weight.numel()  # the classifier: dense


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prune="gradual"), "prune='gradual' is not allowed: one of agp, iterative, none, oneshot"),
        (dict(bits=12), "quant.bits=12 is not allowed: an integer in 2..8"),
        (dict(sparsity=1.0), "prune.final_sparsity=1.0 is not allowed"),
        (dict(epochs=0), "epochs=0 is not allowed"),
        (dict(prune_options={"nope": 1}), "prune.nope: not a key of PruneConfig"),
        (dict(trainer_options={"lr": "fast"}), "trainer: "),
    ],
)
def test_bad_arguments_are_one_line_naming_them(kwargs, message):
    train, _ = loaders(64)
    with pytest.raises(ConfigError) as refused:
        sparsebench.compress(Plain(), train, **kwargs)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_file_of_another_network_is_refused_by_load_and_benchmark(tmp_path: Path):
    train, _ = loaders(64)
    model = sparsebench.compress(
        Plain(), train, epochs=1, prune_options={"keep_first_dense": False}, trainer_options=QUIET
    )
    sparsebench.export(model, tmp_path / "p.safetensors")
    other = nn.Sequential(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match="does not match this model"):
        sparsebench.load(tmp_path / "p.safetensors", other)
    with pytest.raises(ConfigError, match="needs its architecture"):
        sparsebench.benchmark(tmp_path / "p.safetensors", torch.randn(1, 1, 8, 8))
