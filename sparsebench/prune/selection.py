"""Which layers are pruned, and to what final sparsity each (overrides by name or regex)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Dict, List, Set, Tuple

from torch import nn

from sparsebench.errors import ConfigError
from sparsebench.layers import matching_layers, resolve_overrides, weight_layers
from sparsebench.prune.config import load_overrides_file

if TYPE_CHECKING:  # annotations only: no import at run time
    from sparsebench.prune.config import PruneConfig


def prunable_layers(model: nn.Module, cfg: PruneConfig) -> Dict[str, nn.Module]:
    """The conv/linear layers ``cfg`` (a PruneConfig) prunes, by qualified name, in model order.

    ``prune.types`` (class names) and ``prune.layers`` (a regex, full match) narrow the set;
    keep_first_dense / keep_last_dense then drop the model's first and last weight layer.
    """
    every = weight_layers(model)
    names = list(every)
    chosen = names
    if cfg.types:
        chosen = [n for n in names if set(cfg.types) & class_names(every[n])]
        if not chosen:
            present = sorted({type(m).__name__ for m in every.values()})
            raise ConfigError(
                f"prune.types={list(cfg.types)} matches no conv/linear layer; the model's layer classes "
                f"are: {', '.join(present)}"
            )
    if cfg.layers is not None:
        candidates = chosen
        chosen = [n for n in candidates if re.fullmatch(cfg.layers, n)]
        if not chosen:
            of_types = f" of prune.types={list(cfg.types)}" if cfg.types else ""
            raise ConfigError(
                f"prune.layers={cfg.layers!r} matches no conv/linear layer{of_types} (full match); the layers "
                f"are: {', '.join(candidates)}"
            )
    dense = set()
    if cfg.keep_first_dense and names:
        dense.add(names[0])
    if cfg.keep_last_dense and names:
        dense.add(names[-1])
    chosen = [n for n in chosen if n not in dense]
    if not chosen:
        given = [f"prune.layers={cfg.layers!r}"] if cfg.layers is not None else []
        selection = ", ".join(given + ([f"prune.types={list(cfg.types)}"] if cfg.types else [])) or "prune.layers"
        raise ConfigError(
            f"{selection}: no prunable layer is left once keep_first_dense/keep_last_dense keep "
            f"{', '.join(sorted(dense))} dense; the layers are: {', '.join(names)}"
        )
    return {n: every[n] for n in chosen}


def class_names(module: nn.Module) -> Set[str]:
    """The names of every class ``module`` is an instance of (its own and its bases')."""
    return {cls.__name__ for cls in type(module).__mro__}


def final_targets(names: List[str], cfg: PruneConfig, all_layers: List[str]) -> Tuple[Dict[str, float], Set[str]]:
    """Each prunable layer's final sparsity, and the set of layers an override set: prune.final_sparsity,
    then the overrides file, then prune.overrides (regexes first, exact names last, so the most specific wins).

    An entry of ``prune.overrides`` that matches no prunable layer is an error. An entry of the
    overrides file may name a layer this run keeps dense (the file usually comes from a study
    over every layer); it is skipped, but a name no layer has is still an error.
    """
    overridden: Set[str] = set()
    targets = {n: float(cfg.final_sparsity) for n in names}
    listing = ", ".join(names)
    from_file = load_overrides_file(cfg.overrides_file)
    for pattern, value in from_file.items():
        hits = matching_layers(pattern, names)
        if not hits and not matching_layers(pattern, all_layers):
            raise ConfigError(
                f"prune.overrides_file: {pattern!r} matches no layer of the model; the prunable layers are: {listing}"
            )
        targets.update({n: float(value) for n in hits})
        overridden.update(hits)
    given = dict(cfg.overrides)
    chosen, unmatched = resolve_overrides(names, list(given))
    if unmatched:
        pattern = unmatched[0]
        raise ConfigError(
            f"prune.overrides.{pattern}={given[pattern]!r} matches no prunable layer (exact name "
            f"or full-match regex); the prunable layers are: {listing}"
        )
    targets.update({n: float(given[key]) for n, key in chosen.items()})
    overridden.update(chosen)
    return targets, overridden
