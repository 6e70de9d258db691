"""The search-quality benchmark's bookkeeping: how a seed that never succeeds enters the median
and the ratio against random search (the benchmark's numbers themselves are not tested)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "search_quality.py"


@pytest.fixture(scope="module")
def sq() -> ModuleType:
    spec = importlib.util.spec_from_file_location("search_quality", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("search_quality", module)
    spec.loader.exec_module(module)
    return module


def runs(sq: ModuleType, counts: list[int | None]) -> list:
    return [sq.RunResult("l", "cma", seed, 120, 0.3, 0.3, 0.5, 0.5, "cma", c, (), 1.0, None, c)
            for seed, c in enumerate(counts)]


def test_a_seed_that_never_succeeds_counts_above_every_budget(sq: ModuleType) -> None:
    assert sq._median_evals(runs(sq, [30, None, 10, None, 20])) == 30
    assert sq._median_evals(runs(sq, [30, None, 10, None, None])) == math.inf
    assert sq._median_evals(runs(sq, [None, 7, 9]), evolved=True) == 9


def test_ratio_is_a_bound_when_only_random_search_never_succeeded(sq: ModuleType) -> None:
    assert sq.ratio(30, 90, 120) == "0.33"
    assert sq.ratio(30, math.inf, 120) == "< 0.25"  # random needed more than 120
    assert sq.ratio(math.inf, 90, 120) == "-"
    assert sq.ratio(math.inf, math.inf, 120) == "-"


def test_variants_fix_what_they_name_and_leave_the_rest_default(sq: ModuleType, tmp_path: Path) -> None:
    import yaml

    v = sq.Variant.parse("cma/ties@layer_group~ps+dfs+racing=0.2:0.9")
    assert (v.optimizer, v.method, v.granularity, v.space, v.racing, v.racing_spec) == \
        ("cma", "ties", "layer_group", "ps+dfs", True, "=0.2:0.9")
    land = sq.Landscape("l", tmp_path, ("base", "a", "b"))
    auto = yaml.safe_load(sq.write_config(land, "random", 1, 200, tmp_path).read_text())
    assert "merge" not in auto and "space" not in auto and auto["optimizer"] == {"name": "random", "seed": 1}
    both = yaml.safe_load(sq.write_config(land, "cma~ps+dfs", 0, 201, tmp_path).read_text())
    assert both["space"] == "ps+dfs" and both["budget"]["max_trials"] + both["dfs"]["max_trials"] == 201
    fixed = yaml.safe_load(sq.write_config(land, "cma/dare_ties@model", 0, 200, tmp_path).read_text())
    assert fixed["merge"] == {"method": "dare_ties", "granularity": "model"}
