"""The Python API: compress a network of your own, export it, load it back, time it.

    import sparsebench
    model = sparsebench.compress(model, train_loader, val_loader, sparsity=0.9, bits=4, epochs=5)
    sparsebench.export(model, "model.safetensors")
    packed = sparsebench.load("model.safetensors", MyNet())      # runs the packed layers
    table = sparsebench.benchmark("model.safetensors", example_input, model=MyNet())

The same pieces as the Hydra app underneath: the method's defaults come from the same group files
(``conf/prune/<method>.yaml``, ``conf/quant/<method>.yaml``) over the same dataclasses, the pruner and
quantizer are the same training hooks, ``train.fit`` is the same loop, and the export and benchmark
are the run's. No Hydra needed: configs are plain keyword arguments.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from torch import nn

from sparsebench.bench import benchmark_model
from sparsebench.bench.config import BackendConfig, BenchConfig, validate_bench
from sparsebench.config import CONF_DIR, TrainerConfig
from sparsebench.errors import ConfigError
from sparsebench.loaders import Loader
from sparsebench.prune import build_pruner
from sparsebench.prune.config import PruneConfig, validate_prune
from sparsebench.quant import build_quantizer
from sparsebench.quant.config import QuantConfig, validate_quant
from sparsebench.quant.export import export_packed
from sparsebench.sparse import ops
from sparsebench.sparse.modules import load_for_model, packed_model
from sparsebench.train import evaluate, fit

# Where ``compress`` leaves the quantizer's grids on the module it returns (a plain attribute, not a
# submodule: the module's state_dict stays the user's), for ``export`` to write codes on them.
GRIDS_ATTR = "sparsebench_quantizer"
# The app's trainer settings (TrainerConfig's defaults) but for compiling, which a notebook's few epochs
# would not pay back.
API_TRAINER = {"compile": False}


def compress(
    model: nn.Module,
    train: Iterable,
    val: Optional[Iterable] = None,
    *,
    prune: str = "agp",
    sparsity: float = 0.9,
    quant: str = "linear",
    bits: int = 8,
    epochs: int = 10,
    lr: float = 0.05,
    device: Union[str, torch.device, None] = None,
    prune_options: Optional[Dict[str, Any]] = None,
    quant_options: Optional[Dict[str, Any]] = None,
    trainer_options: Optional[Dict[str, Any]] = None,
) -> nn.Module:
    """Prune ``model`` gradually and retrain it quantization-aware on ``train``; returns the module,
    its weights pruned and quantized (scored on ``val`` each epoch when given).

    ``train``/``val``: DataLoaders (or any iterables of ``(inputs, labels)`` batches with a length).
    ``prune``: agp | iterative | oneshot | none; ``quant``: linear | pow2 | kmeans | none; ``sparsity``
    and ``bits`` are their targets (bits 2..8; quant=none keeps fp32). The schedules are fractions of
    the ``epochs`` of retraining, as in the app. ``*_options``: any other key of ``PruneConfig``,
    ``QuantConfig`` or ``TrainerConfig`` (e.g. ``prune_options={"scope": "global"}``). ``device``:
    where to train (default: the model's). Bad settings raise ``ConfigError`` naming the key.
    """
    prune_cfg = group_config(PruneConfig, "prune", prune, {"final_sparsity": sparsity, **(prune_options or {})})
    quant_cfg = group_config(
        QuantConfig, "quant", quant, {"bits": 32 if quant == "none" else bits, **(quant_options or {})}
    )
    trainer = typed(TrainerConfig, "trainer", {**API_TRAINER, "lr": lr, **(trainer_options or {})})
    if epochs < 1:
        raise ConfigError(f"epochs={epochs} is not allowed: an integer >= 1 (pruning and QAT run while retraining)")
    validate_prune(prune_cfg, epochs)
    validate_quant(quant_cfg, epochs)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    train_batches = Loader(train, device)
    val_batches = Loader(val, device) if val is not None else None
    sample = next(iter(train_batches))[0]
    hooks = [h for h in (build_pruner(prune_cfg, model, sample), build_quantizer(quant_cfg, model)) if h is not None]
    fit(
        model,
        train_batches,
        val_batches,
        trainer,
        phase="finetune",
        epochs=epochs,
        lr=lr,
        hooks=hooks,
        checkpoint=None,
    )
    quantizer = next((h for h in hooks if h.name == "quant"), None)
    object.__setattr__(model, GRIDS_ATTR, quantizer)  # not nn.Module's __setattr__: no submodule, no state
    return model.eval()


def export(model: nn.Module, path: Union[str, Path]) -> Dict[str, Dict[str, Any]]:
    """Write ``model``'s conv/linear layers to the packed file ``path`` (BatchNorms folded in; the codes
    of ``compress``'s quantizer, else fp32 values); returns the per-layer facts (nnz, bits, bytes)."""
    return export_packed(model, getattr(model, GRIDS_ATTR, None), Path(path))


def load(path: Union[str, Path], model: nn.Module, *, use_kernels: Optional[bool] = None) -> nn.Module:
    """An ``nn.Module`` that runs the packed layers of ``path`` inside ``model``'s architecture.

    ``model``: the network the file was exported from, or a new instance of its class (everything
    the file does not hold, e.g. a BatchNorm that no conv feeds, comes from it). ``use_kernels``:
    our CUDA kernels (default: when the input is on a GPU and they are built), else the reference.
    A file that does not match ``model`` raises ValueError naming the first difference."""
    layers, meta = load_for_model(Path(path), model)
    if use_kernels is None:
        use_kernels = ops.kernels_available()
    return packed_model(model, layers, meta, use_kernels=use_kernels)


def benchmark(
    model_or_path: Union[nn.Module, str, Path],
    example_input: torch.Tensor,
    *,
    model: Optional[nn.Module] = None,
    backend: str = "direct_sparse",
    activations: str = "fp32",
    baselines: Sequence[str] = ("cudnn_fp32", "cudnn_fp16", "torch_cpu"),
    batch_sizes: Sequence[int] = (1,),
    repeats: int = 50,
    device: Union[str, torch.device, None] = None,
) -> Dict[str, Any]:
    """Time every conv/linear layer and the whole network: ours (``backend``) against ``baselines``.

    ``model_or_path``: a compressed module, or a packed file with its architecture as ``model``.
    ``example_input``: one batch (its first image is repeated to each of ``batch_sizes``). Returns
    ``{"layers": [...], "network": {...}}``: the rows of a run's layers.csv and its metrics.json
    speed keys (``speedup/<baseline>/b<batch>``). Every output is checked against an fp64 reference
    before it is timed. Baselines that cannot run here are skipped and named in ``bench/skipped``."""
    backend_cfg = typed(BackendConfig, "backend", {"name": backend, "activations": activations})
    bench_cfg = typed(
        BenchConfig,
        "bench",
        {"enabled": True, "baselines": list(baselines), "batch_sizes": list(batch_sizes), "repeats": repeats},
    )
    validate_bench(backend_cfg, bench_cfg)
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model_or_path, nn.Module):
            net, path = model_or_path, Path(tmp) / "packed.safetensors"
            export(net, path)
        else:
            if model is None:
                raise ConfigError("model: benchmarking a packed file needs its architecture (model=MyNet())")
            net, path = model, Path(model_or_path)  # every network the benchmark builds runs the file's weights
            load_for_model(path, net)  # a file of another network: one line naming the difference
        rows, metrics = benchmark_model(backend_cfg, bench_cfg, net.to(device), path, example_input.to(device), device)
    if not isinstance(model_or_path, nn.Module):  # the trained module is not here to compare the export with
        metrics = {k: v for k, v in metrics.items() if not k.startswith("network_export_error")}
    return {"layers": rows, "network": metrics}


def accuracy(model: nn.Module, data: Iterable, device: Union[str, torch.device, None] = None) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (a DataLoader of ``(inputs, labels)``), as a fraction."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return evaluate(model, Loader(data, device))


# ---------------------------------------------------------------- helpers


def group_config(schema: type, group: str, method: str, values: Dict[str, Any]) -> Any:
    """``schema``'s defaults, then the app's ``conf/<group>/<method>.yaml``, then ``values``."""
    file = Path(CONF_DIR) / group / f"{method}.yaml"
    if not file.is_file():
        options = sorted(p.stem for p in file.parent.glob("*.yaml"))
        raise ConfigError(f"{group}={method!r} is not allowed: one of {', '.join(options)}")
    return typed(schema, group, {**OmegaConf.to_container(OmegaConf.load(file)), **values})


def typed(schema: type, group: str, values: Dict[str, Any]) -> Any:
    """A ``schema`` dataclass from ``values``; an unknown key or a wrong type is one line naming it."""
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{group}.{unknown[0]}: not a key of {schema.__name__} (keys: {', '.join(sorted(names))})")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except Exception as e:  # OmegaConf's validation errors: the first line names the key and the value
        raise ConfigError(f"{group}: {str(e).splitlines()[0]}") from None
