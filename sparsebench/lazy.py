"""Package attributes imported on first use (PEP 562), so that importing a package's torch-free modules
(its config, for the command lines' config checks) does not load torch and the training stack."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict


def lazy_exports(package: str, where: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that takes each name in ``where`` from its module there."""

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
