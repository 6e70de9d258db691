"""Experiment tracking for real: a search of the demo models logs every candidate to MLflow
(a local SQLite store, offline), and what MLflow hands back matches our table."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from tests.test_search_e2e import demo_config, evomerge, query

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray

if importlib.util.find_spec("mlflow") is None:  # the 'tracking' extra
    if os.environ.get("EVOMERGE_CI"):
        pytest.fail("mlflow not installed (pip install -e '.[tracking]'; make test installs it)", pytrace=False)
    pytest.skip("mlflow not installed (pip install -e '.[tracking]')", allow_module_level=True)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = demo_config(tmp / "s.yaml", max_trials=7, limit=8,
                      tracking={"backend": "mlflow", "uri": uri, "experiment": "merge-runs"})
    evomerge("search", str(cfg), "--storage", f"sqlite:///{tmp / 's.db'}", "--workers", "1", cwd=tmp)
    return tmp / "s.db", uri


def test_every_candidate_is_a_run_with_genes_scores_and_origin(tracked: tuple[Path, str]) -> None:
    from mlflow.tracking import MlflowClient

    db, uri = tracked
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("merge-runs")
    assert experiment is not None
    runs = {r.data.tags["candidate_id"]: r for r in client.search_runs([experiment.experiment_id], max_results=100)}
    cands = query(db, "select id, trial_number, origin, state, scores_json, fitness from evomerge_candidates "
                      "where state in ('complete', 'failed')")
    assert len(cands) == 7 and set(runs) == {str(c[0]) for c in cands}  # one run per finished candidate
    optuna_params = _optuna_params(db)
    for cid, number, origin, state, scores, fitness in cands:
        run = runs[str(cid)]
        assert run.info.run_name == f"trial {number}" and run.info.status == ("FINISHED" if state == "complete" else "FAILED")
        assert run.data.tags["origin"] == origin and run.data.tags["optimizer"] == "cma"
        assert run.data.tags["study"] == "t" and run.data.tags["trial_number"] == str(number)
        expected = {f"score.{t}": v for t, v in json.loads(scores or "{}").items()}
        if fitness is not None:
            expected["fitness"] = fitness
        assert run.data.metrics == pytest.approx(expected)
        # The genes, as Optuna (and the dashboard) shows them; baselines outside the space have none.
        genes = {k: float(v) for k, v in run.data.params.items() if k != "recipe"}
        assert genes == pytest.approx(optuna_params.get(number, {}))
        assert run.data.params["recipe"]
    assert any(o == "cma" for _, _, o, *_ in cands) and any(o == "source" for _, _, o, *_ in cands)


def _optuna_params(db: Path) -> dict[int, dict[str, float]]:
    """Trial number -> Optuna's parameter values (the genes), read from Optuna's own tables."""
    out: dict[int, dict[str, float]] = {}
    for number, name, value in query(db, "select t.number, p.param_name, p.param_value from trial_params p "
                                         "join trials t using(trial_id)"):
        out.setdefault(number, {})[name] = value
    return out
