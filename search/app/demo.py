"""``evomerge demo``: the shipped demo end to end: a search (and with ``--routing`` the layer-routing
studies), one leaderboard, the best recipe replayed into a model folder."""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

from evomerge.search.app.commands import prepare, run_search
from evomerge.search.app.leaderboard import build, combine, render
from evomerge.search.app.progress import phase
from evomerge.search.app.replaying import replay
from evomerge.search.config import SearchConfig, load_config
from evomerge.search.stages import PS_MEMBER


def _routing_demos(cfg: SearchConfig) -> list[tuple[str, SearchConfig]]:
    """The demo's layer-routing studies: DFS over its dfs.models, and PS+DFS over the PS
    demo's best model plus those models."""
    dfs = cfg.model_copy(update={"study": f"{cfg.study}-dfs", "space": "dfs"})
    both = cfg.dfs.model_copy(update={"models": [PS_MEMBER, *cfg.dfs.models], "ps_study": cfg.study})
    return [("dfs", dfs), ("ps+dfs", cfg.model_copy(update={"space": "ps+dfs", "dfs": both}))]


def cmd_demo(args: argparse.Namespace, _url: str | None) -> int:
    # package data of evomerge.demo: its models and tasks are found next to demo.yaml
    with resources.as_file(resources.files("evomerge.demo") / "demo.yaml") as demo_yaml:
        cfg = load_config(demo_yaml)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{out / 'demo.db'}"
    workers, budget = args.workers or cfg.workers.count, args.max_trials or cfg.budget.max_trials
    repo, study_id = run_search(prepare(cfg), url, cfg.study, workers, args.ray_address, budget,
                                cfg.budget.timeout_s)
    board = build(cfg.study, repo.candidates(study_id), 5)
    if args.routing:
        boards = [("ps", board)]
        for label, routed in _routing_demos(cfg):
            repo, sid = run_search(prepare(routed), url, routed.study, workers, args.ray_address, budget,
                                   cfg.budget.timeout_s)
            boards.append((label, build(label, repo.candidates(sid), 5)))
        board = combine(cfg.study, boards)
    print(render(board))
    model_dir = out / "best-model"
    if model_dir.exists():
        shutil.rmtree(model_dir)  # the demo owns this folder; a rerun replaces it
    record = repo.get_study(cfg.study)
    assert record is not None
    with phase("replay: materializing and writing the model folder"):
        folder = replay(repo, cfg.study, record.id, record.config_json, None, model_dir)
    print(f"\nbest PS recipe replayed to {folder}")
    exe = sys.argv[0] if sys.argv[0].endswith("evomerge") else "evomerge"
    print(f"leaderboard: {exe} status --storage {url}\ndashboard:   {exe} dashboard --storage {url}")
    return 0
