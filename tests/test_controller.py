"""Controller behaviour on real parts: identical recipes are evaluated once."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import write_config
from tests.test_failures import _controller


def test_identical_recipes_are_evaluated_once(tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path,
                                              ray_session: None) -> None:
    # One gene and a huge step size: most proposals clip to a corner of the box, so the
    # same recipe is proposed again and again.
    cfg = write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks,
                       merge={"method": "task_arithmetic", "granularity": "model"}, optimizer={"popsize": 4, "sigma0": 1.0},
                       budget={"max_trials": 24})
    controller, repo, study_id = _controller(cfg, tmp_path / "d.db")
    summary = controller.run(24, None)
    controller.close()
    assert summary.done == 24
    cands = repo.candidates(study_id)
    dupes = [c for c in cands if c.duplicate_of is not None]
    assert dupes, "no duplicate proposed; the test lost its point"
    evaluated_hashes = [c.recipe_hash for c in cands if c.duplicate_of is None]
    assert len(evaluated_hashes) == len(set(evaluated_hashes))
    by_id = {c.id: c for c in cands}
    for dup in dupes:
        twin = by_id[dup.duplicate_of]
        assert dup.recipe_hash == twin.recipe_hash and dup.fitness == twin.fitness and dup.scores == twin.scores
        assert dup.worker is None and dup.evaluate_s == 0.0
        assert [a.outcome for a in repo.attempts(dup.id)] == [f"duplicate of candidate {twin.id}"]
