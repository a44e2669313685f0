"""What every Hydra app of the package shares: where the configs are, and the
one-line report of a bad override before Hydra starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, List, Optional

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException

from sparsebench.config import CONF_DIR


def precheck(config_name: str, overrides: List[str]) -> Optional[str]:
    """Compose the config once up front so a bad override becomes one line, not Hydra's page."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name, overrides=overrides)
    except MissingConfigException as e:
        group, _, choice = (e.missing_cfg_file or "").rpartition("/")
        if group and e.options:
            return f"{group}={choice} is not allowed: one of {', '.join(sorted(e.options))}"
        return str(e).splitlines()[0]
    except HydraException as e:
        headline = str(e).splitlines()[0]
        if e.__cause__ is None:
            return headline
        detail = getattr(e.__cause__, "msg", None) or str(e.__cause__)
        return f"{headline}: {detail.splitlines()[0]}"
    return None


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # late: only --version asks

    try:
        return version("sparsebench")
    except PackageNotFoundError:
        return "unknown (not installed)"


def unwritable_dir(args: List[str]) -> Optional[str]:
    """The one-line problem with an explicit hydra.run.dir / hydra.sweep.dir that cannot be created."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") not in ("hydra.run.dir", "hydra.sweep.dir") or not value:
            continue
        folder = Path(os.path.expanduser(value.strip("'\""))).absolute()
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "not a folder" if existing is not None and not existing.is_dir() else "not writable"
            return f"{key.lstrip('+')}={value}: cannot create it ({existing} is {what})"
    return None


def run_checked(app: Callable[[], object], config_name: str) -> None:
    """Run a Hydra app; a plain single run's overrides are checked first (flags such as -m,
    --cfg and --help go straight to Hydra)."""
    args = sys.argv[1:]
    if "--version" in args:
        print(f"sparsebench {package_version()}")
        return
    problem = unwritable_dir(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if not any(a.startswith("-") for a in args):
        problem = precheck(config_name, [a for a in args if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    app()
