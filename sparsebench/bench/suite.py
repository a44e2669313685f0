"""Which backends run here, and the per-layer loop: check, time, compare, estimate break-even."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

from sparsebench.bench.backends import BACKENDS, Prepared, Unsupported, faster_layout, mask_dependent
from sparsebench.bench.cases import LayerCase, thin
from sparsebench.bench.measure import (
    TimingSettings,
    break_even_sparsity,
    check,
    fp16_tensor_peak_tflops,
    make_inputs,
    reference_output,
    result_row,
    time_prepared,
)
from sparsebench.errors import ConfigError
from sparsebench.sparse.ops import _C, set_autotune

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.bench.config import BackendConfig, BenchConfig

log = logging.getLogger("sparsebench.bench")

# On a machine where the configured sparse backend cannot run, this one stands in (CPU).
CPU_FALLBACK = "sparse_reference"
# The break-even fit's second point: the same layer with this share of its nonzeros.
THIN_KEEP = 0.25


@dataclass
class Plan:
    sparse: str  # the backend under test
    baselines: List[str]  # the ones that run here, in config order
    skipped: Dict[str, str] = field(default_factory=dict)  # backend -> why it does not run
    activations: str = "fp32"
    device: torch.device = torch.device("cpu")  # where everything is timed (the CPU after a fallback)


def plan_backends(backend_cfg: BackendConfig, bench_cfg: BenchConfig, device: torch.device) -> Plan:
    """Resolve the configured backends against this machine; log one line per skipped backend."""
    sparse = backend_cfg.name
    activations = backend_cfg.activations
    skipped: Dict[str, str] = {}
    reason = BACKENDS[sparse].unavailable(device)
    if reason:
        if not backend_cfg.fallback:
            raise ConfigError(
                f"backend.name={sparse} cannot run here: {reason} (set backend.fallback=true to time "
                f"the reference sparse forward on the CPU instead)"
            )
        log.warning("bench: backend %s skipped: %s; timing %s instead", sparse, reason, CPU_FALLBACK)
        skipped[sparse] = reason
        sparse, activations, device = CPU_FALLBACK, "fp32", torch.device("cpu")
    if "direct_sparse" in (sparse, *bench_cfg.baselines) and not BACKENDS["direct_sparse"].unavailable(device):
        # The dispatcher's knobs are process-wide: set all of them, so a serial sweep's next job starts clean.
        _C.set_tuning(**(backend_cfg.tuning if sparse == "direct_sparse" else {}))
        set_autotune(backend_cfg.autotune)
    baselines = []
    for name in bench_cfg.baselines:
        if name == sparse or name in baselines:
            continue
        why = BACKENDS[name].unavailable(device)
        if why:
            log.warning("bench: baseline %s skipped: %s", name, why)
            skipped[name] = why
        else:
            baselines.append(name)
    return Plan(sparse=sparse, baselines=baselines, skipped=skipped, activations=activations, device=device)


class LayerBench:
    """Times layer cases on the planned backends; caches baselines that do not depend on the mask."""

    def __init__(self, plan: Plan, settings: TimingSettings, break_even: bool = True):
        self.plan = plan
        self.device = plan.device
        self.peak_tflops = fp16_tensor_peak_tflops(plan.device)
        self.settings = settings
        self.break_even = break_even
        self.unsupported: Dict[Tuple[str, str], str] = {}
        # (id(weight), id(x)) -> (weight, x, fp64 output): the entry holds the tensors so that their ids
        # cannot be reused by a later weight (a baseline's own 2:4 weight, freed, then the thinned layer's).
        self._references: Dict[tuple, tuple] = {}
        self._baseline_rows: Dict[tuple, Dict[str, Any]] = {}

    def prepare(self, name: str, case: LayerCase) -> Optional[Prepared]:
        try:
            return BACKENDS[name].prepare(case, self.device, self.plan.activations)
        except Unsupported as e:
            if (name, case.name) not in self.unsupported:
                log.info("bench: %s skips layer %s: %s", name, case.name, e)
            self.unsupported[(name, case.name)] = str(e)
            return None

    def _reference(self, case: LayerCase, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """fp64 dense output, computed once per (weight, input) and shared by the backends that must match it."""
        key = (id(weight), id(x))
        if key not in self._references:
            self._references[key] = (weight, x, reference_output(case, weight, x, self.device))
        return self._references[key][2]

    def _measure(
        self, name: str, case: LayerCase, batch: int, inputs, layout: Optional[str] = None
    ) -> Optional[Dict[str, Any]]:
        """The backend's row; where it has another layout, the faster of the two (its ``layout`` says
        which), or the one named by ``layout``."""
        prepared = self.prepare(name, case)
        if prepared is None:
            return None
        if prepared.other_layout is None:
            return self._row(name, case, batch, inputs, prepared)
        if layout is not None:
            chosen = prepared if prepared.layout == layout else prepared.other_layout()
            return self._row(name, case, batch, inputs, chosen, True)
        row = self._row(name, case, batch, inputs, prepared, True)
        other_row = self._row(name, case, batch, inputs, prepared.other_layout(), True)
        return other_row if faster_layout(row["time_us"], other_row["time_us"]) else row

    def _row(
        self, name: str, case: LayerCase, batch: int, inputs, prepared: Prepared, named_layout: bool = False
    ) -> Dict[str, Any]:
        label = f"{name} ({prepared.layout})" if named_layout else name  # which layout, should one be wrong
        error = check(case, label, prepared, inputs[0], batch, self._reference(case, prepared.weight, inputs[0]))
        timing = time_prepared(prepared, inputs, self.device, self.settings)
        row = result_row(case, name, batch, timing, prepared, error, self.peak_tflops)
        return {**row, **prepared.columns()}

    def baseline_key(self, name: str, case: LayerCase, batch: int, shape_key: Optional[str]) -> Optional[tuple]:
        """Dense baselines (and 2:4, which uses its own mask) need timing once per layer shape and batch."""
        if shape_key is None:
            return None
        if mask_dependent(name):
            return (name, shape_key, batch, round(case.sparsity, 4))
        return (name, shape_key, batch)

    def run(self, case: LayerCase, batch: int, shape_key: Optional[str] = None) -> List[Dict[str, Any]]:
        """Rows for the backend under test and every baseline; speedups and break-even filled in.

        ``shape_key`` (the sweep): baselines already timed for the same layer shape are reused
        and not repeated as rows.
        """
        inputs = make_inputs(case, batch, self.device, self.settings.cache)
        self._references = {}  # one case's tensors at a time
        ours = self._measure(self.plan.sparse, case, batch, inputs)
        rows = [ours] if ours else []
        baseline_times: Dict[str, float] = {}
        for name in self.plan.baselines:
            key = self.baseline_key(name, case, batch, shape_key)
            if key is not None and key in self._baseline_rows:
                baseline_times[name] = self._baseline_rows[key]["time_us"]
                continue
            row = self._measure(name, case, batch, inputs)
            if row is None:
                continue
            if key is not None:
                if not mask_dependent(name):
                    # It ignores the mask and the codes.
                    row.update(sparsity=None, bits=None, nnz=None, row_nnz_max=None, rows_empty=None)
                self._baseline_rows[key] = row
            baseline_times[name] = row["time_us"]
            rows.append(row)
        for row in rows:
            for name, t in baseline_times.items():
                row[f"speedup_vs_{name}"] = round(t / row["time_us"], 4) if row["time_us"] > 0 else None
        if ours and self.break_even and baseline_times:
            self._add_break_even(ours, case, batch, inputs, baseline_times)
        return rows

    def _add_break_even(
        self, row: Dict[str, Any], case: LayerCase, batch: int, inputs, baseline_times: Dict[str, float]
    ) -> None:
        """Second point: the same layer with a quarter of its nonzeros; t = a + b*nnz through both."""
        g = torch.Generator().manual_seed(1)
        thinned = LayerCase(
            name=case.name,
            kind=case.kind,
            in_shape=case.in_shape,
            packed=thin(case.packed, THIN_KEEP, g),
            weight=case.weight,
            bias=case.bias,
        )
        thinned.weight = thinned.packed.dequantize()
        second = self._measure(self.plan.sparse, thinned, batch, inputs, layout=row.get("layout"))  # the same layout
        points = [(case.packed.nnz, row["time_us"]), (thinned.packed.nnz, second["time_us"])]
        numel = case.packed.out_channels * case.packed.row_length
        for name, t in baseline_times.items():
            if not mask_dependent(name):  # a baseline that itself speeds up with sparsity has no fixed bar
                row[f"break_even_vs_{name}"] = break_even_sparsity(points, t, numel)


def uniform(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every row with every column (None where a backend skipped a layer): tables take the first row's keys."""
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    return [{k: r.get(k) for k in columns} for r in rows]
