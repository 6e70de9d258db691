"""Merge arithmetic 2: a 16-bit merge is the float32 merge of the exactly widened sources, rounded
once (workers/kernels/arithmetic.py), for every operator and on every path (eager chunks, the compiled
kernels, the native kernels, and with them turned off); a study records the version it searched
with, and a replay under another one says so in one line and writes nothing."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from evomerge.storage.repository import Repository
from evomerge.workers.kernels import arithmetic, fused
from evomerge.workers.registry import OPERATORS, Operator
from tests.helpers import DEMO, ROOT, cli_env
from tests.test_bad_input import run_cli

HALF = (torch.bfloat16, torch.float16)
FUSED = ("dare_ties", "dare_linear", "ties", "breadcrumbs", "breadcrumbs_ties", "consensus", "linear",
         "task_arithmetic", "slerp", "model_stock")


def _params(op: Operator, n: int, value: float) -> dict[str, object]:
    """Every parameter of ``op`` at ``value`` scaled into its bounds (per expert: a tuple)."""
    kw: dict[str, object] = {}
    for p in op.params:
        v = p.low + value * (p.high - p.low) if p.high > p.low else p.default
        kw[p.name] = tuple(v * (1 + 0.1 * i) if p.name == "weight" else v for i in range(n)) if p.per_expert else v
    return kw


def _merge(op: Operator, base: torch.Tensor, experts: list[torch.Tensor], kw: dict[str, object]) -> torch.Tensor:
    out = torch.full_like(base, float("nan"))
    op.fn(base, experts, normalize=False, generator=torch.Generator().manual_seed(7), out=out, **kw)
    return out


def _sources(shape: tuple[int, ...], dtype: torch.dtype, n: int, seed: int, spread: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(base + spread * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def _experts_for(op: Operator) -> int:
    low, high = op.experts
    return max(low, min(3, high if high is not None else 3))


def _assert_widened(name: str, base: torch.Tensor, experts: list[torch.Tensor], value: float) -> None:
    op = OPERATORS[name]
    kw = _params(op, len(experts), value)
    merged = _merge(op, base, experts, kw)
    reference = _merge(op, base.float(), [e.float() for e in experts], kw).to(base.dtype)
    differ = int((merged.view(torch.int16) != reference.view(torch.int16)).sum())
    assert differ == 0, f"{name} {base.dtype}: {differ} of {base.numel()} entries differ from the widened merge"


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), seed=st.integers(0, 2**16),
       spread=st.sampled_from([1e-3, 0.05, 1.0]), value=st.floats(0.05, 0.95), half=st.sampled_from(HALF))
def test_every_operator_merges_16_bit_as_widened_float32_rounded_once(rows: int, cols: int, seed: int, spread: float,
                                                                       value: float, half: torch.dtype) -> None:
    for name, op in sorted(OPERATORS.items()):
        base, experts = _sources((rows, cols), half, _experts_for(op), seed, spread)
        _assert_widened(name, base, experts, value)


@pytest.mark.parametrize("native", ["1", "0"])
def test_large_16_bit_merges_take_the_fast_paths_with_the_same_bits(native: str, tmp_path: Path) -> None:
    """Above fused.FUSE_MIN the compiled kernels (and the native selection and sums) serve 16-bit
    tensors: still the widened float32 merge, rounded once; the same with the native kernels off."""
    code = f"""
import torch
from tests.test_merge_arithmetic import FUSED, _assert_widened, _experts_for, _sources
from evomerge.workers.kernels import fused
from evomerge.workers.registry import OPERATORS
for half in (torch.bfloat16, torch.float16):
    for name in FUSED:
        base, experts = _sources((fused.FUSE_MIN // 512 + 3, 512), half, _experts_for(OPERATORS[name]), 3, 0.05)
        _assert_widened(name, base, experts, 0.4)
assert not fused._MERGE.broken and not fused._CONSENSUS.broken
print("ok")
"""
    env = cli_env(EVOMERGE_NATIVE=native)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_fused_kernels_take_16_bit_tensors() -> None:
    big = torch.zeros(fused.FUSE_MIN)
    for half in HALF:
        assert fused.takes([big.to(half)] * 3)
        assert not fused.takes([big.to(half), big, big])  # one dtype per merge
        assert not fused.takes([big[:100].to(half)] * 3)  # small CPU tensors stay eager


def test_mismatch_is_only_where_the_arithmetic_changed() -> None:
    assert arithmetic.mismatch("s", None, "float32") is None  # float32 merges did not change
    assert arithmetic.mismatch("s", arithmetic.MERGE_ARITHMETIC, "bfloat16") is None
    changed = arithmetic.mismatch("s", None, "bfloat16")
    assert changed is not None and changed.stored == 1
    assert "merge arithmetic 1" in changed.line("x") and f"arithmetic {arithmetic.MERGE_ARITHMETIC}" in changed.line("x")


FIXTURE_HOME = "/tmp/evomerge-fixture-0.1.0"  # where the 0.1.0 database's config points


def _old_study(tmp_path: Path, dtype: str) -> Path:
    """The 0.1.0 database (no arithmetic recorded) with its study's dtype set to ``dtype`` and its
    model paths moved to a copy of the demo's models in ``tmp_path``."""
    db = tmp_path / "old.db"
    shutil.copy(ROOT / "tests" / "data" / "evomerge-0.1.0.db", db)
    for part in ("models", "tasks"):
        shutil.copytree(DEMO / part, tmp_path / part)
    with sqlite3.connect(db) as conn:
        (text,) = conn.execute("SELECT config_json FROM evomerge_studies WHERE name = 'prev'").fetchone()
        assert FIXTURE_HOME in text
        cfg = json.loads(text.replace(FIXTURE_HOME, str(tmp_path)))
        cfg.setdefault("workers", {})["dtype"] = dtype
        conn.execute("UPDATE evomerge_studies SET config_json = ? WHERE name = 'prev'", (json.dumps(cfg),))
    return db


def test_replay_under_another_arithmetic_is_refused_in_one_line(tmp_path: Path) -> None:
    db = _old_study(tmp_path, "bfloat16")
    proc = run_cli("replay", "--storage", f"sqlite:///{db}", "--study", "prev", "--out", str(tmp_path / "m"),
                   cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "merge arithmetic 1" in lines[0] and "--allow-arithmetic-change" in lines[0], lines
    assert not (tmp_path / "m").exists()
    proc = run_cli("replay", "--storage", f"sqlite:///{db}", "--study", "prev", "--out", str(tmp_path / "m"),
                   "--allow-arithmetic-change", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "m" / "config.json").exists()


def test_float32_study_of_an_older_release_replays_without_a_word(tmp_path: Path) -> None:
    db = _old_study(tmp_path, "float32")
    proc = run_cli("replay", "--storage", f"sqlite:///{db}", "--study", "prev", "--out", str(tmp_path / "m"),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arithmetic" not in proc.stderr and (tmp_path / "m" / "config.json").exists()


def test_new_studies_record_their_arithmetic_and_device(tmp_path: Path) -> None:
    repo = Repository(f"sqlite:///{tmp_path / 'n.db'}")
    try:
        repo.create_study("s", "{}", arithmetic.MERGE_ARITHMETIC, "cpu")
        stored = repo.get_study("s")
        assert stored is not None and (stored.merge_arithmetic, stored.device) == (arithmetic.MERGE_ARITHMETIC, "cpu")
    finally:
        repo.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_replay_on_a_device_this_machine_lacks_is_refused_in_one_line(tmp_path: Path) -> None:
    db = _old_study(tmp_path, "float32")
    proc = run_cli("replay", "--storage", f"sqlite:///{db}", "--study", "prev", "--out", str(tmp_path / "m"),
                   "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--device cuda" in lines[0] and "no CUDA device" in lines[0], lines
    assert not (tmp_path / "m").exists()
