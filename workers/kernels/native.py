"""Native kernels: C++ sources shipped beside this module, compiled on first use and loaded
with ctypes (no torch headers, no build step at install).

A library is built once per source (with the folder's headers), compiler and CPU (the key
hashes all of them and the flags: it is compiled with ``-march=native`` unless
$EVOMERGE_NATIVE_ARCH names another target) into ``$EVOMERGE_NATIVE_CACHE``
(default ``~/.cache/evomerge/native``, or the temporary directory where home is read-only), written to a temporary name and renamed, so workers
starting together never load a half-written file. Where no compiler works, or ``EVOMERGE_NATIVE=0``, :func:`library` returns None after one
logged line and callers take their torch path, which computes the same values.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' dtype codes
# no FMA contraction: a·b + c rounds twice, as torch's ops do, so results are bit-identical to them
_FLAGS = ("-O3", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-pthread")


def _flags(arch: str | None = None) -> tuple[str, ...]:
    """The compiler's flags: for ``arch``, else the target named in $EVOMERGE_NATIVE_ARCH (e.g.
    ``x86-64-v3``: a library that runs on the older CPUs of a cluster sharing one cache; the
    kernels compute the same bits on every target), else this CPU (``-march=native``)."""
    return (f"-march={arch or os.environ.get('EVOMERGE_NATIVE_ARCH', 'native')}", *_FLAGS)


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(lines)))


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _build(source: Path, cache: Path, arch: str | None = None) -> Path:
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    flags = _flags(arch)
    key = hashlib.sha256("\0".join([source.read_text(), *headers, compiler, version, *flags, _cpu_key()]).encode()).hexdigest()
    target = cache / f"{source.stem}-{key[:16]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, suffix=".so.part")
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, "-o", partial, str(source)], capture_output=True, text=True, check=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _cache() -> Path:
    """$EVOMERGE_NATIVE_CACHE, else ~/.cache/evomerge/native, else (a home that cannot be written)
    a folder of this user's in the temporary directory."""
    if "EVOMERGE_NATIVE_CACHE" in os.environ:
        return Path(os.environ["EVOMERGE_NATIVE_CACHE"])
    home = Path.home() / ".cache" / "evomerge" / "native"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    shared = Path(tempfile.gettempdir()) / f"evomerge-native-{os.getuid()}"
    shared.mkdir(mode=0o700, exist_ok=True)
    info = shared.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:  # a library loaded from here runs as this user
        raise OSError(f"{shared} is not this user's private folder")
    return shared


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled ``name``.cpp of this folder, or None where it cannot be built or is turned off
    (logged once per process)."""
    if os.environ.get("EVOMERGE_NATIVE", "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(_build(_HERE / f"{name}.cpp", _cache())))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        log.warning("native kernel %s unavailable (%s); using the torch path", name,
                    detail.strip().splitlines()[0] if detail.strip() else type(error).__name__)
        return None


@functools.cache
def kernel(name: str, function: str, argtypes: tuple[type, ...]) -> Callable[..., int] | None:
    """``function`` of the compiled ``name``.cpp, its arguments typed and returning an int status,
    or None where the library is unavailable."""
    lib = library(name)
    if lib is None:
        return None
    fn = getattr(lib, function)
    fn.restype = ctypes.c_int
    fn.argtypes = list(argtypes)
    return fn  # type: ignore[no-any-return]


def takes(tensors: Sequence[Tensor], dtypes: Sequence[torch.dtype] = tuple(DTYPES), min_numel: int = 1,
          max_numel: int = 1 << 62) -> bool:
    """Whether a kernel can read these tensors in place: one dtype of ``dtypes``, one size within
    the bounds, contiguous, on the CPU."""
    n, dtype = tensors[0].numel(), tensors[0].dtype
    return (min_numel <= n < max_numel and dtype in dtypes
            and all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype and t.numel() == n
                    for t in tensors))


def pointers(tensors: Sequence[Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    """The tensors' data addresses as a C array of pointers."""
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def threads() -> int:
    """The threads a kernel runs on: torch's intra-op count, which a worker sets."""
    return max(1, torch.get_num_threads())
