"""Presets and field-dependent defaults, applied when a config file is read."""

from __future__ import annotations

from pathlib import Path

import yaml

from evomerge.search.config import SearchConfig, load_config, stored_config
from evomerge.search.presets import AMPLIFY


def _write(path: Path, **overrides: object) -> Path:
    cfg: dict[str, object] = {"models": [{"name": "base", "path": "."}, {"name": "a", "path": "."},
                                         {"name": "b", "path": "."}],
                              "base_model": "base", "evaluation": {"tasks": [{"name": "t"}]}}
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_default_searches_amplifying_weights(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "c.yaml"))
    assert cfg.preset is None and cfg.merge.ranges == {"weight": AMPLIFY}
    assert (cfg.merge.method, cfg.merge.granularity) == ("auto", "auto")  # the search chooses both
    assert cfg.optimizer.name == "cma" and cfg.optimizer.start == "best_baseline" and cfg.optimizer.restarts > 0


def test_given_ranges_and_methods_without_weights_are_left_alone(tmp_path: Path) -> None:
    given = load_config(_write(tmp_path / "r.yaml", merge={"ranges": {"density": [0.2, 0.9]}}))
    assert given.merge.ranges == {"density": (0.2, 0.9)}
    pinned = load_config(_write(tmp_path / "f.yaml", merge={"fixed": {"weight": 1.0}}))
    assert pinned.merge.ranges == {}
    slerp = load_config(_write(tmp_path / "s.yaml", models=[{"name": "a", "path": "."}, {"name": "b", "path": "."}],
                               base_model="a", merge={"method": "slerp"}))
    assert slerp.merge.ranges == {}


def test_sakana_preset_is_the_papers_setting(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "p.yaml", preset="sakana"))
    assert cfg.preset == "sakana" and cfg.merge.method == "dare_ties" and cfg.merge.granularity == "model"
    assert cfg.merge.ranges == {}  # weights and densities in the operator's [0, 1]
    o = cfg.optimizer
    assert (o.name, o.init, o.sigma0, o.start, o.restarts) == ("cma", 0.5, 1 / 6, "init", 0)
    # What the config gives wins over the preset.
    seeded = load_config(_write(tmp_path / "q.yaml", preset="sakana", optimizer={"seed": 7, "popsize": 12}))
    assert seeded.optimizer.seed == 7 and seeded.optimizer.popsize == 12 and seeded.optimizer.start == "init"


def test_stored_configs_are_not_changed_by_new_defaults(tmp_path: Path) -> None:
    """A study stored with no weight range (before the default existed) keeps its identity."""
    cfg = load_config(_write(tmp_path / "c.yaml", merge={"ranges": {}}))
    assert cfg.merge.ranges == {}
    again = stored_config(cfg.model_dump_json(), "x")
    assert again.identity_json() == cfg.identity_json() and isinstance(again, SearchConfig)
