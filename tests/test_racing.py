"""The racing rule (evaluators/racing.py): its bound holds, and it decides as documented."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evomerge.evaluators.racing import (Partial, RacingSettings, fitness_bound, generation_bar, keep_going, upper_bound,
                                        wilson_upper)

pytestmark = pytest.mark.usefixtures("joined_ray")  # its `evomerge` subprocesses join one shared Ray

means = st.floats(0.0, 1.0)
confidences = st.sampled_from([0.9, 0.95, 0.99])


@given(means, st.integers(1, 500), confidences)
def test_wilson_bound_is_a_probability_above_the_mean(mean: float, n: int, confidence: float) -> None:
    bound = wilson_upper(mean, n, confidence)
    assert mean - 1e-12 <= bound <= 1.0
    assert wilson_upper(mean, n * 4, confidence) <= bound + 1e-12  # more documents, tighter


@given(means, st.integers(1, 300), st.integers(0, 300), confidences)
def test_full_sample_bound_lies_between_the_mean_and_one(mean: float, seen: int, rest: int, confidence: float) -> None:
    bound = upper_bound(mean, seen, seen + rest, confidence)
    assert mean - 1e-12 <= bound <= 1.0 + 1e-12
    if rest == 0:
        assert abs(bound - mean) < 1e-12


@pytest.mark.parametrize("confidence", [0.95, 0.99])
@pytest.mark.parametrize("seen,total", [(50, 200), (100, 200), (20, 80)])
def test_bound_covers_the_full_sample_mean_at_its_confidence(confidence: float, seen: int, total: int) -> None:
    """Simulated 0/1 documents: the full-sample mean exceeds the bound from the first
    ``seen`` about as often as the confidence allows. The bound is approximate (racing.py
    states the simulated coverage): allowed, 1.6 x the nominal miss rate plus 3 sigma of the
    simulation's own noise; a bound on the population mean alone misses ~1.5-2 x more."""
    rng = random.Random(0)
    misses, runs = 0, 3000
    for _ in range(runs):
        p = rng.random()
        docs = [1.0 if rng.random() < p else 0.0 for _ in range(total)]
        if sum(docs) / total > upper_bound(sum(docs[:seen]) / seen, seen, total, confidence):
            misses += 1
    nominal = 1 - confidence
    assert misses / runs <= 1.6 * nominal + 3 * (nominal * confidence / runs) ** 0.5


def test_a_candidate_stops_only_when_it_cannot_reach_the_bar() -> None:
    weights = {"a": 1.0, "b": 1.0}
    hopeless = {"a": Partial(0.05, 50, 200), "b": Partial(0.10, 50, 200)}
    close = {"a": Partial(0.60, 50, 200), "b": Partial(0.55, 50, 200)}
    assert not keep_going(hopeless, weights, bar=0.6, confidence=0.99)
    assert keep_going(close, weights, bar=0.6, confidence=0.99)
    assert keep_going(hopeless, weights, bar=None, confidence=0.99)
    # a task scored in full enters with its score: nothing to bound
    assert fitness_bound({"a": Partial(0.3, 200, 200)}, {"a": 1.0}, 0.99) == 0.3


def test_first_stage_size() -> None:
    on = RacingSettings(enabled=True, fraction=0.25, min_documents=20)
    assert on.first_stage(200) == 50
    assert on.first_stage(60) is None  # 15 documents would be too few to decide on
    assert RacingSettings(enabled=False).first_stage(200) is None


def test_stages_grow_geometrically_to_the_whole_sample() -> None:
    three = RacingSettings(enabled=True, fraction=0.2, stages=3)
    assert three.cuts(200) == (40, 90, 200)  # 20 %, 0.2 ** 0.5 = 44.7 %, all
    assert RacingSettings(enabled=True, fraction=0.2, stages=2).cuts(200) == (40, 200)
    assert three.cuts(60) is None  # a 12-document first stage: not raced
    assert RacingSettings(enabled=False).cuts(200) is None


@given(st.integers(1, 5000), st.floats(0.01, 0.95), st.integers(2, 8))
def test_stage_cuts_increase_to_every_document(count: int, fraction: float, stages: int) -> None:
    cuts = RacingSettings(enabled=True, fraction=fraction, stages=stages, min_documents=1).cuts(count)
    if cuts is None:  # the first stage would already be every document
        assert math.ceil(fraction * count) >= count
        return
    assert cuts[0] == math.ceil(fraction * count) and cuts[-1] == count
    assert list(cuts) == sorted(set(cuts)) and len(cuts) <= stages


def test_generation_bar_is_the_worst_parent_of_the_last_generation() -> None:
    assert generation_bar([0.1, 0.2, 0.3], popsize=4) is None  # the first generation runs in full
    assert generation_bar([0.9, 0.1, 0.2, 0.3, 0.4], popsize=4) == 0.3  # last 4: 0.4 0.3 | 0.2 0.1


def test_the_bar_reads_the_last_finished_candidates_in_proposal_order(tmp_path: Path) -> None:
    from evomerge.storage.repository import Repository

    repo = Repository(f"sqlite:///{tmp_path / 'r.db'}")
    try:
        study = repo.create_study("s", "{}").id
        ids = [repo.add_candidate(study, "{}", f"h{i}", "cma") for i in range(7)]
        for cid, fitness in zip(ids[:4], (0.4, 0.1, 0.3, 0.2)):
            repo.complete(cid, scores={"t": fitness}, fitness=fitness, worker="w", materialize_s=0.0, evaluate_s=0.0)
        repo.complete(ids[4], scores={"t": 0.9}, fitness=0.9, worker="w", materialize_s=0.0, evaluate_s=0.0,
                      duplicate_of=ids[0])  # a copy: not counted
        repo.fail(ids[5], "boom")
        repo.complete(ids[6], scores={"t": 0.5}, fitness=0.5, worker="w", materialize_s=0.0, evaluate_s=0.0)
        assert repo.recent_fitnesses(study, 3) == [0.3, 0.2, 0.5]
        assert repo.recent_fitnesses(study, 10) == [0.4, 0.1, 0.3, 0.2, 0.5]
        assert generation_bar(repo.recent_fitnesses(study, 4), popsize=4) == 0.3
    finally:
        repo.close()


def test_a_smaller_kept_share_raises_the_bar() -> None:
    last = [0.5, 0.9, 0.1, 0.7, 0.3, 0.6, 0.2, 0.8]  # popsize 8: 0.9 0.8 | 0.7 0.6 | 0.5 ...
    assert generation_bar(last, popsize=8, keep=0.5) == 0.6
    assert generation_bar(last, popsize=8, keep=0.25) == 0.8
    assert generation_bar(last, popsize=8, keep=0.01) == 0.9  # at least the best one is kept
    assert generation_bar(last, popsize=8, keep=1.0) == 0.1  # everything but the hopeless finishes


def test_racing_on_real_tasks_stops_the_hopeless_and_scores_the_rest_exactly() -> None:
    """The demo's models on its three 200-document tasks, racing in the default three stages
    (after 40, 90 and 200 documents of each)."""
    from evomerge.evaluators.harness import Evaluator
    from evomerge.search.config import load_config
    from evomerge.workers.materialize import Materializer
    from evomerge.workers.recipe import MergeRecipe, Recipe, SourceRecipe
    from evomerge.workers.sources import validate_sources
    from tests.helpers import ROOT

    cfg = load_config(ROOT / "demo" / "demo.yaml")
    on = cfg.evaluation.model_copy(update={"racing": cfg.evaluation.racing.model_copy(update={"enabled": True})})
    suite = cfg.model_copy(update={"evaluation": on}).suite()
    mat = Materializer(validate_sources(cfg.sources()), cfg.base_model)
    evaluator = Evaluator(suite, mat.model, mat.tokenizer, batch_size=200)
    mat.apply(MergeRecipe(method="task_arithmetic", base="base", models=("cipher_a", "cipher_b"),
                     params={"weight": {"cipher_a": (0.75,), "cipher_b": (0.75,)}}))
    full = evaluator.score()
    for bar in (None, 0.0):  # nothing to race against / any candidate can reach it
        scoring = evaluator.race(bar)
        assert scoring.complete and scoring.documents == 600
        assert scoring.scores == pytest.approx(full, abs=1e-12)  # two disjoint parts, one mean
    mat.apply(SourceRecipe(source="base"))  # echoes words: scores 0 everywhere
    stopped = evaluator.race(0.9)
    assert not stopped.complete and stopped.documents == 120
    assert stopped.scores == {"cipher_a": 0.0, "cipher_b": 0.0, "cipher_mix": 0.0}
    off = Evaluator(cfg.suite(), mat.model, mat.tokenizer, batch_size=200).race(0.9)  # racing off: in full
    assert off.complete and off.documents == 600
    # The whole sample and the two stages keep their requests: nothing is rebuilt per call
    # (a single cached set was rebuilt at every stage: racing cost more than it saved).
    task = evaluator._tasks[False]["cipher_a"]
    before = {key: id(instances) for key, instances in task._built.items()}
    evaluator.race(0.0)
    assert len(before) == 4 and {key: id(instances) for key, instances in task._built.items()} == before


def test_a_racing_search_records_the_documents_of_every_candidate(tmp_path: Path) -> None:
    import sqlite3

    import yaml

    from tests.test_search_e2e import demo_config, evomerge

    cfg = demo_config(tmp_path / "cfg.yaml", 26, limit=200)
    data = yaml.safe_load(cfg.read_text())
    data["evaluation"]["racing"] = {"enabled": True}
    data["optimizer"]["popsize"] = 6
    cfg.write_text(yaml.safe_dump(data))
    db = tmp_path / "s.db"
    evomerge("search", str(cfg), "--storage", f"sqlite:///{db}", "--workers", "2", cwd=tmp_path)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT origin, documents, raced_out, state FROM evomerge_candidates "
                            "WHERE duplicate_of IS NULL").fetchall()
        cpu = [s for (s,) in conn.execute("SELECT evaluate_cpu_s FROM evomerge_candidates WHERE duplicate_of IS NULL")]
        attrs = conn.execute("SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'documents'").fetchone()[0]
    assert {state for *_, state in rows} == {"complete"}
    for origin, documents, raced_out, _ in rows:
        if origin in ("source", "untuned"):  # baselines are always scored in full
            assert (documents, raced_out) == (600, 0)
        else:  # 40 or 90 of each task's 200 documents (stopped after stage 1 or 2), or all of them
            assert (documents, raced_out) in ((120, 1), (270, 1), (600, 0))
    assert attrs >= len(rows)
    assert all(s is not None and s > 0 for s in cpu)  # the worker's CPU seconds of every scoring
