"""The commands that write a model folder: ``replay`` (a study's candidate, merged on the device
it searched on) and ``merge`` (a merge file). They load the merge engine (torch, transformers);
the search command does not import this module."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from evomerge.search.app.commands import search_device
from evomerge.search.app.merge_file import load_merge_file
from evomerge.search.app.progress import phase
from evomerge.search.app.reading import UsageError, find_study, open_repo
from evomerge.search.config import SearchConfig, stored_config
from evomerge.search.ranking import best_candidate
from evomerge.search.stages import dfs_study
from evomerge.storage.kinds import State
from evomerge.storage.repository import CandidateRecord, Repository, StudyRecord
from evomerge.workers.kernels import arithmetic
from evomerge.workers.materialize import Materializer
from evomerge.workers.mergekit import MergekitConfigError, to_mergekit
from evomerge.workers.recipe import MergeRecipe, Recipe, parse_recipe
from evomerge.workers.replay import model_card, write_model_folder
from evomerge.workers.sources import SourceModel, validate_sources


def _pick(cands: list[CandidateRecord], trial: int | None) -> CandidateRecord:
    if trial is not None:
        match = [c for c in cands if c.trial_number == trial]
        if not match:
            raise UsageError(f"no trial {trial} in this study")
        if match[0].state != State.COMPLETE:
            raise UsageError(f"trial {trial} did not complete ({match[0].state}: {match[0].error})")
        return match[0]
    best = best_candidate(cands)
    if best is None:
        raise UsageError("the study has no completed trial yet")
    return best


def _replayed(repo: Repository, study_id: int, trial: int | None) -> tuple[CandidateRecord, Recipe]:
    cand = _pick(repo.candidates(study_id), trial)
    if cand.duplicate_of is not None:
        cand = repo.candidate(cand.duplicate_of)
    return cand, parse_recipe(cand.recipe_json)


def _best_stage(repo: Repository, name: str, study_id: int, trial: int | None) -> tuple[str, int]:
    """Without --trial, a PS+DFS search replays the best of both stages."""
    dfs = repo.get_study(dfs_study(name))
    if trial is not None or dfs is None:
        return name, study_id
    ps_best, dfs_best = best_candidate(repo.candidates(study_id)), best_candidate(repo.candidates(dfs.id))
    if dfs_best is not None and (ps_best is None or (dfs_best.fitness or 0.0) > (ps_best.fitness or 0.0)):
        return dfs.name, dfs.id
    return name, study_id


def replay_device(study: StudyRecord, cfg: SearchConfig, asked: str | None) -> str:
    """Where a replay merges: ``asked``, else the device the study searched on (same device, same
    bits). A study searched on a GPU replays on the CPU where none is here, with one line saying
    that the result equals the search's within the cross-device tolerance (docs/merge-engine.md)."""
    searched = study.device or search_device(cfg)
    device = asked or searched
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            if asked is not None:
                raise UsageError(f"--device {asked}: torch sees no CUDA device on this machine")
            print(f"replay: study {study.name!r} searched on {searched}; no CUDA device here, replaying on cpu "
                  "(equal to the search's merge within 1 unit in the last place, not bit for bit)", file=sys.stderr)
            return "cpu"
    if device.split(":")[0] != searched.split(":")[0]:
        print(f"replay: on {device}, study {study.name!r} searched on {searched}: equal to the search's merge "
              "within 1 unit in the last place, not bit for bit", file=sys.stderr)
    return device


def replay(repo: Repository, study: str, study_id: int, config_json: str, trial: int | None, out: Path,
           allow_pickle: bool = False, device: str = "cpu") -> Path:
    """Write a candidate of the study as a model folder, merged on ``device``; returns the folder."""
    cfg = stored_config(config_json, study)
    cand, recipe = _replayed(repo, study_id, trial)
    folders = validate_sources(cfg.sources(), allow_pickle, cfg.base_model)
    materializer = Materializer(folders, cfg.base_model, getattr(torch, cfg.workers.dtype), device=device,
                                allow_pickle=allow_pickle)
    card = model_card(recipe, study, cand.trial_number, cand.scores, cand.fitness, cand.heldout,
                      cand.heldout_fitness)
    return write_model_folder(materializer, recipe, out, card)


def cmd_replay(args: argparse.Namespace, url: str) -> int:
    repo = open_repo(url, must_exist=True)
    name, study_id, config_json = find_study(repo, args.study, url)
    name, study_id = _best_stage(repo, name, study_id, args.trial)
    if args.out is None and args.mergekit_yaml is None:
        raise UsageError("give --out (a model folder), --mergekit-yaml (a mergekit config), or both")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise UsageError(f"--out {out} already exists; choose a new folder")
    cfg = stored_config(config_json, name)  # a stored config that no longer validates: one line, no phase
    record = repo.get_study(name)
    assert record is not None  # found above
    changed = arithmetic.mismatch(name, record.merge_arithmetic, cfg.workers.dtype)
    if out is not None and changed is not None and not args.allow_arithmetic_change:
        raise UsageError(changed.line("a replay would differ from the model the search scored "
                                      "(--allow-arithmetic-change writes it anyway)"))
    device = replay_device(record, cfg, args.device) if out is not None else "cpu"
    if args.mergekit_yaml:
        _, recipe = _replayed(repo, study_id, args.trial)
        try:
            text = to_mergekit(recipe, {m.name: m.path for m in cfg.models}, cfg.workers.dtype)
        except MergekitConfigError as exc:
            raise UsageError(f"no mergekit config for this recipe: {exc}") from None
        Path(args.mergekit_yaml).write_text(text)
        print(f"wrote {args.mergekit_yaml}")
    if out is not None:
        with phase("replay: materializing and writing the model folder"):
            folder = replay(repo, name, study_id, config_json, args.trial, out, args.allow_pickle, device)
        print(f"wrote {folder}")
    return 0


def cmd_merge(args: argparse.Namespace, _url: str | None) -> int:
    job = load_merge_file(args.config)
    for warning in job.warnings:
        print(f"evomerge: warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    if out.exists():
        raise UsageError(f"--out {out} already exists; choose a new folder")
    recipe = job.recipe
    base = recipe.sources()[0]
    used = dict.fromkeys(n for n in (*recipe.sources(), job.tokenizer_source) if n)
    merge_base = recipe.base if isinstance(recipe, MergeRecipe) else None  # a lone source may be an adapter
    folders = validate_sources([SourceModel(n, job.sources[n]) for n in used], args.allow_pickle, merge_base)
    materializer = Materializer(folders, base, getattr(torch, job.dtype), allow_pickle=args.allow_pickle)
    if job.tokenizer_source:
        materializer.tokenizer = AutoTokenizer.from_pretrained(folders[job.tokenizer_source])
    card = model_card(recipe, Path(args.config).stem, None, None, None, None, None)
    print(f"wrote {write_model_folder(materializer, recipe, out, card)}")
    return 0
