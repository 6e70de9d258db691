"""The suite's own scheduling rule holds: tests of one xdist group run on one pytest-xdist worker
(tests/conftest.py; test_outage stops PostgreSQL under the other PostgreSQL tests, and a module's
search fixture is built once). pytest-xdist's grouping broke silently once (pytest 9.2 with
pytest-xdist 3.8: pytest-dev/pytest-xdist#1386), so it is checked here with a real run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

_RECORD = """
import os
from pathlib import Path

import pytest


@pytest.mark.parametrize("i", range(6))
def test_record(i: int) -> None:
    out = Path(os.environ["GROUPS_OUT"]) / f"{Path(__file__).stem}-{i}"
    out.write_text(os.environ["PYTEST_XDIST_WORKER"])
"""


def test_a_serial_group_runs_on_one_worker(tmp_path: Path) -> None:
    suite, out = tmp_path / "suite", tmp_path / "out"
    suite.mkdir(), out.mkdir()
    for name in ("test_outage", "test_postgres", "test_unrelated"):  # the first two: the "postgres" group
        (suite / f"{name}.py").write_text(_RECORD)
    env = {**os.environ, "GROUPS_OUT": str(out), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "tests.conftest",
                           "-p", "no:cacheprovider", "--rootdir", str(suite), "-c", os.devnull, str(suite)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    worker = {p.name: p.read_text() for p in out.iterdir()}
    assert len(worker) == 18
    grouped = {w for name, w in worker.items() if not name.startswith("test_unrelated")}
    assert len(grouped) == 1, worker
