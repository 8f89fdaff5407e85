"""Native CPU kernels in C: compiled on first use with the system's C compiler (`cc`, or $CC)
for this CPU, with OpenMP where the compiler has it, and cached per source, compiler flags and
CPU features in $SAMENGINE_CACHE (default ~/.cache/samengine/kernels). The cache is keyed by
content, not path, so copies of the code (`ray job submit --working-dir`, fresh clones) share
one build per node. SAMENGINE_NATIVE=0 turns every kernel off (their torch paths run)."""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno"]


def enabled() -> bool:
    return os.environ.get("SAMENGINE_NATIVE", "1") != "0"


class Library:
    """A C source built and loaded on first use, once per process. `get()` is the library,
    bound by `bind` (argument and result types), or None where native kernels are off or it
    cannot be built (with a warning naming `what`, once)."""

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str,
                 logger: logging.Logger = log, flags: list[str] | None = None):
        self.source, self.bind, self.what, self.logger = source, bind, what, logger
        self.flags = list(FLAGS if flags is None else flags)
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable

    def get(self) -> ctypes.CDLL | None:
        if not enabled():
            return None
        with self._lock:
            if self._lib is False:
                self._lib = load(self.source, self.flags, self.bind, self.what, self.logger)
            return self._lib


def load(source: Path, flags: list[str], bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str,
         logger: logging.Logger = log) -> ctypes.CDLL | None:
    """The built library of `source`, bound by `bind` (argument and result types), or None
    with a warning naming `what` where it cannot be built or loaded."""
    try:
        return bind(ctypes.CDLL(str(build(source, flags, what, logger))))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        logger.warning("%s unavailable, using torch: %s", what, e)
        return None


def build(source: Path, flags: list[str], what: str, logger: logging.Logger = log) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    try:
        return _compile(source, compiler, [*flags, "-fopenmp"])
    except RuntimeError as e:  # a compiler without OpenMP (Apple's clang): kernels on one thread
        logger.warning("%s built without OpenMP, on one thread: %s", what, e)
        return _compile(source, compiler, flags)


def _cache_dir() -> Path:
    root = os.environ.get("SAMENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "samengine")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's features as -march=native sees them (a cache shared by unlike nodes must not
    hand one of them another's instructions)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), platform.processor())
    except OSError:
        return platform.processor() or platform.machine()


def _compile(source: Path, compiler: str, flags: list[str]) -> Path:
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join([compiler, *flags]).encode(),
                                     _cpu_signature().encode(), platform.machine().encode()])).hexdigest()[:20]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One build per node: the actors a node starts at once wait for the first one's build
    # instead of each compiling the same source (a lock file beside the target; where the
    # filesystem has no flock, each builds and the atomic rename keeps one).
    with open(target.with_suffix(".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        if not target.exists():
            _run_compiler(source, compiler, flags, target)
    return target


def _run_compiler(source: Path, compiler: str, flags: list[str], target: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a process that finds the target loads a whole build
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
