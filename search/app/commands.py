"""The ``search`` command: check the config, sources and tasks before any work, then run the study
(both stages for PS+DFS) with a worker pool and print its leaderboard. Torch's models, transformers'
and lm-eval's engine stay out of this process: the workers load them (workers/pool.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.search.config import ConfigError, SearchConfig, check_study_name, load_config, stored_config
from evomerge.search.controller import Controller, StudyMismatch
from evomerge.search.spaces import Space
from evomerge.search.app.dashboard import DashboardObserver
from evomerge.search.app.leaderboard import count_reasons, render
from evomerge.search.app.planning import check_search
from evomerge.search.app.progress import Progress
from evomerge.search.app.reading import UsageError, open_repo, study_leaderboard
from evomerge.search.app.tracking import open_tracker
from evomerge.search.ledger import Ledger
from evomerge.search.observers import SearchObserver
from evomerge.search.optimizers import OPTIMIZERS, Arm
from evomerge.search.ranking import best_candidate
from evomerge.search.stages import PS_MEMBER, collection, dfs_study, ps_space, route_space
from evomerge.storage.engine import redacted
from evomerge.storage.kinds import State
from evomerge.storage.repository import Repository
from evomerge.evaluators.tasks import check_suite
from evomerge.workers.kernels import arithmetic
from evomerge.workers.worker_spec import WorkerSpec
from evomerge.workers.kernels.arithmetic import MERGE_ARITHMETIC
from evomerge.workers.pool import WorkerPool
from evomerge.workers.recipe import Recipe, RouteRecipe, parse_recipe
from evomerge.workers.route_spec import RouteError, check_routable
from evomerge.workers.sources import check_finite, read_config, validate_sources

class SearchFailed(RuntimeError):
    """Every trial, or every held-out re-score, of a search failed (exit status 1); one line
    with the reasons counted."""


@dataclass(frozen=True)
class Prepared:
    cfg: SearchConfig
    folders: dict[str, Path]
    space: Space  # the first stage's: PS for ps and ps+dfs, routes for dfs
    allow_pickle: bool = False


def prepare(cfg: SearchConfig, allow_pickle: bool = False) -> Prepared:
    """Check sources and tasks before anything is written (SourceError / TaskError)."""
    folders = validate_sources(cfg.sources(), allow_pickle, cfg.base_model)
    check_finite(folders, allow_pickle)
    # names, splits, metrics and settings, with the tasks built as the workers will; the chat
    # template of the tokenizer the workers use (the base model's)
    check_suite(cfg.suite(), folders.get(cfg.base_model), cfg.base_model)
    routed = [m for m in collection(cfg) if m in folders]  # the PS model of ps+dfs has the base's config
    if cfg.space != "ps" and routed:
        try:
            check_routable({m: read_config(m, folders[m]) for m in routed}, routed[0])
        except RouteError as exc:
            raise ConfigError(f"dfs.models: {exc}") from None
    if cfg.space == "dfs":
        return Prepared(cfg, folders, route_space(cfg, folders, {}), allow_pickle)
    return Prepared(cfg, folders, ps_space(cfg, folders), allow_pickle)


def objectives(cfg: SearchConfig) -> list[str]:
    """What the study's trials are scored by: the fitness, or each task (multi-objective)."""
    if OPTIMIZERS[cfg.optimizer.name].multi_objective:
        return [t.name for t in cfg.evaluation.tasks]
    return ["fitness"]


def describe_arms(arms: Sequence[Arm]) -> str:
    """One line for the start of a search with ``merge.method``/``granularity: auto``."""
    coarse = ", ".join(f"{a.label}: {a.dim} genes" for a in arms if a.refines is None)
    finer = sorted({a.dim for a in arms if a.refines is not None})
    return (f"auto over {len(arms)} arms ({coarse}" + (f"; each also per layer group ({'/'.join(map(str, finer))} "
            "genes), from its best per-model genome and from its untuned merge, once it stalls" if finer else "")
            + ")")


def run_search(prep: Prepared, url: str, study: str, workers: int, ray_address: str | None,
               max_trials: int, timeout_s: float | None) -> tuple[Repository, int]:
    """Create or resume ``study`` and search (PS+DFS: both stages); returns the repository and
    the last stage's study id."""
    cfg = prep.cfg
    if cfg.space != "ps+dfs":
        return _run_study(prep, prep.space, url, study, workers, ray_address, max_trials, timeout_s)
    if cfg.dfs.ps_study:
        repo = open_repo(url)
        record = repo.get_study(cfg.dfs.ps_study)
        if record is None:
            raise UsageError(f"dfs.ps_study {cfg.dfs.ps_study!r} is not a study in {redacted(url)}")
        ps_id = record.id
    else:
        repo, ps_id = _run_study(prep, prep.space, url, study, workers, ray_address, max_trials, timeout_s)
    space = route_space(cfg, prep.folders, {PS_MEMBER: _ps_member(repo, ps_id, dfs_study(study))})
    return _run_study(prep, space, url, dfs_study(study), workers, ray_address, cfg.dfs.max_trials or max_trials,
                      timeout_s)


def _ps_member(repo: Repository, ps_id: int, dfs_name: str) -> Recipe:
    """The PS model of a PS+DFS search: the one its DFS study already uses, else the PS study's best."""
    record = repo.get_study(dfs_name)
    if record is not None:
        for cand in repo.candidates(record.id):
            recipe = parse_recipe(cand.recipe_json)
            if isinstance(recipe, RouteRecipe) and PS_MEMBER in recipe.members:
                return recipe.members[PS_MEMBER]
    best = best_candidate(repo.candidates(ps_id))
    if best is None:
        raise UsageError("the PS stage has no completed trial: nothing to route over")
    if best.duplicate_of is not None:
        best = repo.candidate(best.duplicate_of)
    return parse_recipe(best.recipe_json).model_copy(update={"label": ""})


def _run_study(prep: Prepared, space: Space, url: str, study: str, workers: int, ray_address: str | None,
               max_trials: int, timeout_s: float | None) -> tuple[Repository, int]:
    cfg = prep.cfg
    repo = open_repo(url)
    record = repo.get_study(study)
    if record is None:
        record = repo.create_study(study, cfg.model_dump_json(), MERGE_ARITHMETIC, search_device(cfg))
    elif (changed := arithmetic.mismatch(study, record.merge_arithmetic, cfg.workers.dtype)) is not None:
        raise StudyMismatch(changed.line("resuming it would mix two arithmetics in one study; use another --study"))
    elif stored_config(record.config_json, study).identity_json() != cfg.identity_json():
        raise StudyMismatch(f"study {study!r} in {redacted(url)} was started with a different config "
                            "(models, space, merge, dfs, optimizer or tasks); use another --study")
    elif any(c.trial_number is not None for c in repo.candidates(record.id)) and not Ledger.exists(url, study):
        # Recreating it would number trials anew beside candidates that point at the old ones.
        raise StudyMismatch(f"study {study!r} in {redacted(url)} has candidates but its Optuna trials are gone "
                            "(deleted from the dashboard?); resume is impossible: start another --study")
    ledger = Ledger(url, study, objectives(cfg), repo.patience_s, repo.clock)
    study_id = record.id
    done_before = sum(1 for c in repo.candidates(study_id) if c.state.finished)
    progress = Progress(max_trials, done_before)
    # What the search reports reaches the terminal, optuna-dashboard and the tracker through these.
    observers: list[SearchObserver] = [
        progress, DashboardObserver(ledger, lambda: repo.candidates(study_id)),
        open_tracker(cfg.tracking, study, cfg.optimizer.name, space)]
    wcfg = cfg.workers
    spec = WorkerSpec(prep.folders, cfg.base_model, cfg.suite(), wcfg.dtype,
                      search_device(cfg), cfg.evaluation.batch_size, wcfg.threads,
                      prep.allow_pickle, wcfg.sources)
    controller = Controller(cfg, repo, ledger, space,
                            lambda: WorkerPool(spec, workers, wcfg.num_cpus, wcfg.num_gpus, ray_address,
                                               job_timeout_s=wcfg.job_timeout_s),
                            study_id, observers)
    arms = space.arms(cfg.optimizer.popsize, cfg.optimizer.init)
    genes = describe_arms(arms) if arms else f"{space.dim} genes, popsize {controller.popsize}"
    print(f"study {study!r} in {redacted(url)}: {done_before}/{max_trials} trials done before this run, "
          f"{workers} worker(s), {genes}", file=sys.stderr)
    final = None
    try:
        progress.phase("start-up: Ray and workers")
        summary = controller.run(max_trials, timeout_s)
        progress.phase("held-out re-scoring")
        heldout = controller.rescore_heldout()
        final = (f"{summary.evaluated_now} evaluated in {summary.elapsed_s:.0f}s, worker utilisation "
                 f"{summary.utilisation:.0%}, {heldout} re-scored on the held-out split")
    finally:
        progress.close(final)
        controller.close()
    _check_outcomes(repo, record.id, study, heldout, controller.heldout_failed)
    return repo, record.id


def _check_outcomes(repo: Repository, study_id: int, study: str, heldout: int, heldout_failed: dict[int, str]) -> None:
    """SearchFailed when every finished trial failed, or every held-out re-score of this run
    (``heldout`` scored, ``heldout_failed`` candidate -> reason) did; a warning line when
    only some re-scores failed. The reasons are counted."""
    done = [c for c in repo.candidates(study_id) if c.state.finished]
    if done and all(c.state == State.FAILED for c in done):
        raise SearchFailed(f"study {study!r}: all {len(done)} trials failed: {_counted(c.error for c in done)}")
    if not heldout_failed:
        return
    line = f"{len(heldout_failed)} held-out re-scores failed: {_counted(heldout_failed.values())}"
    if heldout == 0:
        raise SearchFailed(f"study {study!r}: all {line}")
    print(f"evomerge: warning: study {study!r}: {line} ({heldout} succeeded)", file=sys.stderr)


def _counted(reasons: Iterable[str | None], shown: int = 3) -> str:
    """'12 x reason' for the most common reasons, most frequent first."""
    counts = count_reasons(reasons)
    more = f"; {sum(n for _, n in counts[shown:])} more with {len(counts) - shown} other reasons" \
        if len(counts) > shown else ""
    return "; ".join(f"{n} x {reason}" for reason, n in counts[:shown]) + more


def cmd_search(args: argparse.Namespace, url: str) -> int:
    cfg = load_config(args.config)
    study = args.study or cfg.study
    try:
        check_study_name(study)
    except ValueError as exc:
        raise UsageError(f"--study: {exc}") from None
    check_search(cfg, args.workers or cfg.workers.count, args.ray_address, args.allow_pickle)  # before any work
    prep = prepare(cfg, args.allow_pickle)
    repo, _ = run_search(prep, url, study, args.workers or cfg.workers.count, args.ray_address,
                         args.max_trials or cfg.budget.max_trials, args.timeout or cfg.budget.timeout_s)
    ps_name = (cfg.dfs.ps_study or study) if cfg.space == "ps+dfs" else study
    print(render(study_leaderboard(repo, study, ps_name, 10)))
    return 0


def search_device(cfg: SearchConfig) -> str:
    """The device a study's workers merge on: "cuda" with GPUs per worker, else "cpu"."""
    return "cuda" if cfg.workers.num_gpus > 0 else "cpu"


