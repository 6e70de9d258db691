"""The quick CLI: --version, and the commands that need no model (--help, status, dashboard's
checks) import none of torch, transformers, Ray, lm-eval, Optuna (nor numpy, pydantic);
methods' text fits 100 columns without docstring markup and has a JSON form."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evomerge
from tests.helpers import ROOT, cli_env

HEAVY = ("torch", "transformers", "ray", "lm_eval", "optuna", "optuna_dashboard", "numpy", "pydantic")
# Runs one CLI call in a fresh interpreter, then prints which heavy packages it imported.
PROBE = """
import json, sys
from evomerge.search.app.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:  # --help
    status = exc.code
print(json.dumps({"status": status, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r)}))
""" % (HEAVY,)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evomerge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=cli_env())


def _probe(tmp_path: Path, *args: str) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=cli_env())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    proc = _cli("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"evomerge {evomerge.__version__}\n"


@pytest.mark.parametrize("command", [
    ["--help"],
    ["status", "--storage", "sqlite:///db.db"],
    ["status", "--storage", "sqlite:///db.db", "--json"],
    ["dashboard", "--storage", "sqlite:///missing.db"],  # refused before Optuna is loaded
    ["methods"],
    ["methods", "--json"],
])
def test_reading_commands_import_nothing_heavy(tmp_path: Path, command: list[str]) -> None:
    shutil.copy(ROOT / "tests" / "data" / "evomerge-0.1.0.db", tmp_path / "db.db")
    result = _probe(tmp_path, *command)
    assert result["heavy"] == [] and result["status"] == (2 if command[0] == "dashboard" else 0), result


def test_methods_text_is_plain_and_fits_100_columns(tmp_path: Path) -> None:
    proc = _cli("methods", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert not any(mark in proc.stdout for mark in ("``", ":func:", ":mod:", ":class:"))
    assert lines[0].startswith("linear: ") and any(line.startswith("transform lines: ") for line in lines)


def test_methods_json_lists_every_method_with_its_parameters(tmp_path: Path) -> None:
    from evomerge.workers.registry import OPERATORS, TRANSFORMS

    proc = _cli("methods", "--json", cwd=tmp_path)
    entries = json.loads(proc.stdout)
    assert [e["name"] for e in entries if e["kind"] == "method"] == list(OPERATORS)
    assert [e["name"] for e in entries if e["kind"] == "transform"] == list(TRANSFORMS)
    dare = next(e for e in entries if e["name"] == "dare_ties")
    assert dare["random"] is True and {p["name"] for p in dare["params"]} == {"density", "weight", "scale"}
    assert all(set(p) == {"name", "low", "high", "default", "doc", "per_expert", "searched"} for p in dare["params"])


def test_the_quick_list_of_multi_objective_optimizers_is_the_registry_s() -> None:
    from evomerge.search.optimizers import OPTIMIZERS
    from evomerge.search.names import MULTI_OBJECTIVE

    assert MULTI_OBJECTIVE == {name for name, cls in OPTIMIZERS.items() if cls.multi_objective}


def test_every_declared_method_has_exactly_its_implementation() -> None:
    """workers/methods.py (torch-free, what `methods` and the config read) and the tensor
    functions registered in workers/operators.py name the same methods and parameters."""
    from evomerge.workers.methods import METHODS, TRANSFORMS_DECLARED
    from evomerge.workers.registry import OPERATORS, TRANSFORMS

    assert set(OPERATORS) == set(METHODS) and set(TRANSFORMS) == set(TRANSFORMS_DECLARED)
    for name, op in OPERATORS.items():
        assert op.params == METHODS[name].params and op.experts == METHODS[name].experts


def test_the_search_controller_loads_no_worker_engine(tmp_path: Path) -> None:
    """What ``evomerge search`` runs in its own process before it starts the workers (the command's
    module, the checks of sources, tasks and plan, the pool) leaves the workers' engine to them:
    no transformers model code, no materializer, no evaluation worker (~2 s of every start)."""
    from tests.test_search_e2e import demo_config

    cfg = demo_config(tmp_path / "c.yaml", 4)
    probe = ("import json, sys\nfrom evomerge.search.app import commands, planning\n"
             "from evomerge.search.config import load_config\nimport evomerge.workers.pool\n"
             "cfg = load_config(sys.argv[1])\nplanning.check_search(cfg, 2, None)\ncommands.prepare(cfg)\n"
             "print(json.dumps(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", probe, str(cfg)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded and "lm_eval" in loaded  # the checks' own needs: the probe ran them
    engine = {"transformers.modeling_utils", "evomerge.workers.actor", "evomerge.workers.materialize",
              "evomerge.workers.candidate_model", "evomerge.evaluators.harness"}
    assert not engine & loaded, sorted(engine & loaded)
