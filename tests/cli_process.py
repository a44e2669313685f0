"""The package's command lines in processes of their own, forked from a server that has already imported
torch, torch._dynamo (every optimizer's first use imports it), Hydra and the apps: about 5 s a call less
than a fresh interpreter on a 2-core machine, with the same isolation (its own exit code, signals,
process group, environment and working folder; environment variables that torch reads at import, such
as OMP_NUM_THREADS, keep the server's values). Tests of what a fresh interpreter does (--help,
--version, a stop signalled to a process group) start one instead."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional

APPS = {"sparsebench": "sparsebench.__main__", "sparsebench-bench": "sparsebench.bench.grid"}
PRELOAD = ["torch", "torch._dynamo", "hydra", *APPS.values(), "sparsebench.experiment", __name__]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _child(command: str, args: List[str], cwd: str, env: Dict[str, str], out: str, err: str) -> None:
    """In the forked process: the console script's main() with this argv, folder, environment and output."""
    os.setsid()  # a group of its own: a timeout kills its workers too
    multiprocessing.set_start_method(None, force=True)  # its own workers start as a console script's do (fork)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):  # the files get what the app and its own child processes write
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered: an os._exit loses nothing
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [command, *args]
    try:
        __import__(APPS[command], fromlist=["main"]).main()
    finally:
        # An interpreter's exit, which a multiprocessing child skips before it joins its own children: joblib
        # shuts its idle workers down here (else the process would wait 300 s for their idle timeout).
        threading._shutdown()
        atexit._run_exitfuncs()


class Started:
    """A command running in its forked process: ``pid`` to signal it, ``wait`` for its result."""

    def __init__(self, command: str, args: List[str], cwd: Path, env: Dict[str, str]):
        self.args = [command, *args]
        self._tmp = tempfile.mkdtemp(prefix="cli-")
        self._out, self._err = os.path.join(self._tmp, "stdout"), os.path.join(self._tmp, "stderr")
        self._process = _context.Process(target=_child, args=(command, list(args), str(cwd), env, self._out, self._err))
        self._process.start()

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """The exit code (-N for signal N, as subprocess gives it) and everything the process wrote."""
        self._process.join(timeout)
        try:
            read = lambda path: Path(path).read_text() if os.path.exists(path) else ""  # noqa: E731
            if self._process.is_alive():
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.join()
                raise subprocess.TimeoutExpired(self.args, timeout, read(self._out), read(self._err))
            return subprocess.CompletedProcess(self.args, self._process.exitcode, read(self._out), read(self._err))
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def start(command: str, args: List[str], cwd: Path, env: Dict[str, str]) -> Started:
    """``command ARGS`` (a console script of the package) started in a forked process."""
    return Started(command, args, cwd, env)


def run(command: str, args: List[str], cwd: Path, env: Dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``command ARGS`` run to its end in a forked process, as subprocess.run with capture_output=True does."""
    return start(command, args, cwd, env).wait(timeout)
