"""Declarations first, implementations bound on first use (evomerge.workers.methods/registry)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.workers.methods import METHODS, MethodSpec, ParamSpec, declare, method_spec
from evomerge.workers.registry import OPERATORS, Bound, Operator

ROOT = Path(__file__).resolve().parents[1]


def test_config_loads_without_torch() -> None:
    # A fresh interpreter: this one has torch loaded by other tests.
    code = ("import sys, evomerge.search.config as c; c.load_config('examples/demo.yaml'); "
            "bad = [m for m in ('torch', 'transformers', 'lm_eval', 'ray') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_name_declared_twice_is_refused() -> None:
    spec = MethodSpec("twice", (), "a method")
    with pytest.raises(ValueError, match="'twice' is declared twice"):
        declare("merge method", (spec, spec))


def test_every_declaration_binds_to_its_function() -> None:
    for name, spec in METHODS.items():
        op = OPERATORS[name]
        assert op.fn.__name__ == spec.target.rpartition(":")[2] and op.params == spec.params


def test_unknown_names_and_targets_say_what_is_known() -> None:
    with pytest.raises(KeyError, match="unknown merge method 'nope' \\(known: .*dare_ties"):
        method_spec("nope")
    with pytest.raises(KeyError, match="unknown merge method 'nope'"):
        OPERATORS["nope"]
    weight = ParamSpec("weight", 0.0, 1.0, 0.5, "w")
    missing = Bound("merge method", {"x": MethodSpec("x", (weight,), "d", impl="evomerge.workers.operators:nowhere")},
                    Operator)
    assert "x" in missing and list(missing) == ["x"]  # declared: known without binding
    with pytest.raises(ImportError, match="evomerge.workers.operators:nowhere: no such function"):
        missing["x"]
