"""Speed measurement: the backend registry and per-layer / whole-network timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn


def benchmark_model(backend: Any, bench: Any, model: nn.Module, packed: Optional[Path], sample: torch.Tensor,
                    device: torch.device) -> Tuple[List[Dict[str, Any]], Dict[str, float]]:
    """Time every conv/linear layer and the whole network on the configured backends.

    Returns (layers.csv rows: one per layer x backend x batch, metrics such as
    ``speedup/<baseline>/b<batch>``). With ``bench.enabled=false`` both are empty.
    """
    return [], {}
