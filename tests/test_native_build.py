"""Building the native kernels (workers/kernels/native.py) and doing without them: every kernel builds
on this machine, a build for an older CPU and the torch paths merge to the same bits as the
kernels built for this one, an empty cache fills without partial files, a missing compiler
costs one log line."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evomerge.workers.kernels import gram, native, selection

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("band_scan", "band_merge", "gram")

# Every operator with a native kernel, float32 and bfloat16, large enough for every path
# (several sample blocks, Gram blocks and vector tails).
_MERGES = (
    "import sys, torch\n"
    "from evomerge.workers.registry import OPERATORS\n"
    "from evomerge.workers.kernels import native\n"
    "g = torch.Generator().manual_seed(3)\n"
    "base = torch.randn(300_007, generator=g)\n"
    "experts = [base + 0.1 * torch.randn(300_007, generator=g) for _ in range(3)]\n"
    "three = dict(density=(0.4, 0.6, 0.2), weight=(1.0, 0.5, 0.7))\n"
    "out = {}\n"
    "for dtype in (torch.float32, torch.bfloat16):\n"
    "    b, e = base.to(dtype), [x.to(dtype) for x in experts]\n"
    "    out[f'ties {dtype}'] = OPERATORS['ties'].fn(b, e, **three)\n"
    "    out[f'breadcrumbs {dtype}'] = OPERATORS['breadcrumbs'].fn(b, e, gamma=(0.02, 0.05, 0.1), **three)\n"
    "    out[f'breadcrumbs_ties {dtype}'] = OPERATORS['breadcrumbs_ties'].fn(\n"
    "        b, e[:2], density=(0.4, 0.6), gamma=(0.02, 0.05), weight=(1.0, 0.5))\n"
    "    out[f'model_stock {dtype}'] = OPERATORS['model_stock'].fn(b, e)\n"
    "    out[f'slerp {dtype}'] = OPERATORS['slerp'].fn(b, e[:1], t=0.3)\n"
    "torch.save({k: v.view(torch.int32 if v.dtype == torch.float32 else torch.int16) for k, v in out.items()},\n"
    "           sys.argv[1])\n"
    "print(all(native.library(k) is None for k in ('band_scan', 'band_merge', 'gram')))\n")


def _merged(tmp_path: Path, name: str, **env: str) -> dict[str, torch.Tensor]:
    done = subprocess.run([sys.executable, "-c", _MERGES, str(tmp_path / f"{name}.pt")], cwd=ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("True" if env.get("EVOMERGE_NATIVE") == "0" else "False")
    return torch.load(tmp_path / f"{name}.pt")


@pytest.fixture(scope="module")
def native_bits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The merges with the kernels built for this CPU (once for the tests that compare to them)."""
    return _merged(tmp_path_factory.mktemp("native"), "native")


def test_the_kernels_build_here() -> None:
    """This machine has a C++ compiler (torch.compile needs one too): the native paths run in
    the tests rather than silently falling back."""
    for kernel in KERNELS:
        assert native.library(kernel) is not None, kernel


def test_without_native_kernels_the_operators_give_the_same_bits(tmp_path: Path,
                                                                native_bits: dict[str, torch.Tensor]) -> None:
    """EVOMERGE_NATIVE=0 (or no compiler): the torch paths merge, to the same bits."""
    kernels, torch_paths = native_bits, _merged(tmp_path, "torch", EVOMERGE_NATIVE="0")
    assert kernels.keys() == torch_paths.keys()
    for key in kernels:
        assert torch.equal(kernels[key], torch_paths[key]), key


def _runs_x86_64_v3() -> bool:
    if platform.machine() != "x86_64":
        return False
    flags = Path("/proc/cpuinfo").read_text().split()
    return all(flag in flags for flag in ("avx2", "fma", "bmi2"))


@pytest.mark.skipif(not _runs_x86_64_v3(), reason="needs a CPU that runs x86-64-v3 code")
def test_a_build_for_an_older_cpu_gives_the_same_bits(tmp_path: Path,
                                                       native_bits: dict[str, torch.Tensor]) -> None:
    """EVOMERGE_NATIVE_ARCH=x86-64-v3 (AVX2 and FMA, no AVX-512, as AMD's Zen 2 and 3): the
    kernels' AVX2 paths (the Gram's) and scalar paths (the others', which a -march=native build
    on this machine runs only for tails) merge to the same bits."""
    kernels, older = native_bits, _merged(tmp_path, "v3", EVOMERGE_NATIVE_ARCH="x86-64-v3")
    for key in kernels:
        assert torch.equal(kernels[key], older[key]), key


def _build_for(name: str, arch: str) -> ctypes.CDLL:
    """``name``.cpp compiled for ``arch`` (into the usual cache: the key holds the flags)."""
    return ctypes.CDLL(str(native._build(ROOT / "workers" / "kernels" / f"{name}.cpp", native._cache(), arch)))


@pytest.mark.skipif(not _runs_x86_64_v3(), reason="needs a CPU that runs x86-64-v3 code")
def test_the_gram_is_the_same_bits_on_avx_512_avx2_and_scalar_builds() -> None:
    """gram.cpp built for this CPU (AVX-512 here), for x86-64-v3 (its AVX2 path) and for x86-64
    (scalar): the same 16 lanes summed in the same order, so the same float64 bits, in float32
    and bfloat16, with and without a base, for counts kept in registers (1-3) and the general
    loop (5), at sizes with tails of every length class and across blocks (2^13 entries)."""
    builds = {arch: _build_for("gram", arch) for arch in ("native", "x86-64-v3", "x86-64")}
    g = torch.Generator().manual_seed(5)
    for numel in (1, 15, 17, 8192 + 8 + 3, 3 * 8192 + 21):
        for count, with_base in ((1, False), (2, False), (3, True), (5, True)):
            for dtype in (torch.float32, torch.bfloat16):
                base = torch.randn(numel, generator=g).to(dtype) if with_base else None
                tensors = [(torch.randn(numel, generator=g) * 10.0 ** (2 * i - 3)).to(dtype) for i in range(count)]
                grams = {}
                for arch, lib in builds.items():
                    out = torch.empty((count, count), dtype=torch.float64)
                    fn = lib.evomerge_gram
                    fn.restype, fn.argtypes = ctypes.c_int, list(gram._ARGS)
                    assert fn(native.DTYPES[dtype], base.data_ptr() if base is not None else None,
                              native.pointers(tensors), count, numel, 1,
                              ctypes.cast(out.data_ptr(), ctypes.POINTER(ctypes.c_double))) == 0
                    grams[arch] = out.view(torch.int64)
                for arch in ("x86-64-v3", "x86-64"):
                    assert torch.equal(grams[arch], grams["native"]), (arch, numel, count, dtype)


@pytest.mark.skipif(not _runs_x86_64_v3(), reason="needs a CPU that runs x86-64-v3 code")
def test_the_magnitude_cuts_are_the_same_on_avx_512_avx2_and_scalar_builds() -> None:
    """band_scan.cpp's selection built for this CPU (16 lanes), for x86-64-v3 (8 lanes, a table in
    place of AVX-512's compress) and for x86-64 (scalar) gives the same cuts, tie splits and
    misses: float32 and bfloat16 (whose δ take few values: ties at the cuts), with and without a
    base, one and two cuts per expert, sizes whose tails take every vector remainder."""
    builds = {arch: _build_for("band_scan", arch) for arch in ("native", "x86-64-v3", "x86-64")}
    g = torch.Generator().manual_seed(11)
    for numel in (64, 4096 + 13, 3 * 16384 + 7, 200_003):
        for dtype in (torch.float32, torch.bfloat16):
            for with_base in (True, False):
                base = torch.randn(numel, generator=g).to(dtype) if with_base else None
                experts = [(torch.randn(numel, generator=g) * 0.1).to(dtype) for _ in range(3)]
                wants = [(0, numel // 3), (1, numel // 10), (1, numel // 2), (2, 1), (2, numel - 1)]
                found = {}
                for arch, lib in builds.items():
                    fn = lib.evomerge_select
                    fn.restype, fn.argtypes = ctypes.c_int, list(selection._ARGS)
                    slots = len(wants)
                    value, until, ok = (ctypes.c_uint32 * slots)(), (ctypes.c_int64 * slots)(), (ctypes.c_int * slots)()
                    assert fn(native.DTYPES[dtype], base.data_ptr() if base is not None else None,
                              native.pointers(experts), len(experts), numel,
                              (ctypes.c_int * slots)(*[i for i, _ in wants]),
                              (ctypes.c_int64 * slots)(*[k for _, k in wants]), slots,
                              selection.sample_size(numel), 3.5, 2, value, until, ok) == 0
                    found[arch] = (list(value), list(until), list(ok))
                assert all(found["native"][2]), (numel, dtype)  # the cuts were found, not all missed
                for arch in ("x86-64-v3", "x86-64"):
                    assert found[arch] == found["native"], (arch, numel, dtype, with_base)


def test_a_fresh_cache_builds_and_a_missing_compiler_falls_back(tmp_path: Path) -> None:
    """Into an empty cache folder the library is built once and loaded; with no compiler there is
    one warning line naming the kernel, and the torch path."""
    script = ("import logging; logging.basicConfig()\n"
              "from evomerge.workers.kernels import native\n"
              "print(native.library('band_scan') is not None)\n")
    built = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "EVOMERGE_NATIVE_CACHE": str(tmp_path / "cache")})
    assert built.stdout.strip() == "True", built.stderr
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".so"]  # no partial file left
    missing = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "EVOMERGE_NATIVE_CACHE": str(tmp_path / "empty"),
                                  "CXX": str(tmp_path / "no-such-compiler")})
    assert missing.stdout.strip() == "False"
    assert "native kernel band_scan unavailable" in missing.stderr and "torch path" in missing.stderr
