"""lm-eval task definitions: found once, built once per worker, per split.

Tasks are lm-eval YAML files in the configured task folders, or lm-eval's built-in
tasks by name. The same task is built for the search split and the held-out split
(``test_split`` overridden), so the search never sees held-out documents.
:func:`check_suite` builds them the same way in the controller before any worker starts,
so a wrong name, split or metric is one line before anything is written.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evomerge.evaluators.lm_eval_adapter import reusable_task_class
from evomerge.evaluators.settings import apply_settings, check_chat_template, check_settings, sample_docs
from evomerge.evaluators.spec import TaskError, TaskSpec, TaskSuite


def find_local_task(name: str, task_paths: tuple[Path, ...]) -> tuple[dict[str, Any], Path] | None:
    """The YAML config of task ``name`` in ``task_paths``, with the file it came from."""
    for folder in task_paths:
        for file in sorted(folder.rglob("*.yaml")):
            try:
                cfg = yaml.safe_load(file.read_text())
            except yaml.YAMLError:
                continue  # lm-eval YAMLs with !function tags are not ours to parse
            if isinstance(cfg, dict) and cfg.get("task") == name:
                return cfg, file
    return None


def _resolve_data_files(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make ``dataset_kwargs.data_files`` absolute relative to the YAML (lm-eval uses the cwd)."""
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if files is None:
        return cfg

    def absolute(path: str) -> str:
        resolved = (folder / path).resolve() if not Path(path).is_absolute() else Path(path)
        if not resolved.is_file():
            raise TaskError(f"task {cfg.get('task')!r}: data file not found: {resolved}")
        return str(resolved)

    if isinstance(files, str):
        cfg["dataset_kwargs"]["data_files"] = absolute(files)
    elif isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: absolute(v) for k, v in files.items()}
    else:
        cfg["dataset_kwargs"]["data_files"] = [absolute(v) for v in files]
    return cfg


def task_config(spec: TaskSpec, suite: TaskSuite, split: str | None) -> dict[str, Any] | None:
    """The lm-eval config dict of a local task for ``split``, or None for a built-in task."""
    found = find_local_task(spec.name, suite.task_paths)
    if found is None:
        return None
    cfg, file = found
    cfg = _resolve_data_files(copy.deepcopy(cfg), file.parent)
    if split is not None:
        cfg["test_split"] = split
    return cfg


def build_task_dict(suite: TaskSuite, heldout: bool) -> dict[str, Any]:
    """lm-eval Task objects for the search (or held-out) split, keyed by our task name, with
    each task's settings applied."""

    split = suite.heldout_split if heldout else suite.search_split
    if heldout and split is None:
        raise TaskError("no held-out split configured")
    field = "evaluation.heldout_split" if heldout else "evaluation.search_split"
    built: dict[str, Any] = {}
    builtin: list[TaskSpec] = []
    for spec in suite.tasks:
        cfg = task_config(spec, suite, split)
        if cfg is None:
            builtin.append(spec)
            continue
        _check_file_split(spec.name, cfg, split, field)
        if heldout:  # a distinct lm-eval name, so nothing keyed by task name mixes the splits
            cfg["task"] = f"{spec.name}__{split}"
        try:
            built[spec.name] = reusable_task_class()(config=cfg)
        except KeyError as exc:  # lm-eval reads the test split while building the task
            if split is not None and exc.args == (split,):
                raise TaskError(f"{field} {split!r}: task {spec.name!r} has no such split") from None
            raise TaskError(f"task {spec.name!r}: cannot be built: KeyError {exc}") from None
        except Exception as exc:
            raise TaskError(f"task {spec.name!r}: cannot be built: {_one_line(exc)}") from None
    if builtin:
        manager = _builtin_manager(suite, builtin)
        for spec in builtin:
            try:  # a dict naming a registered task does not override it in lm-eval 0.4: load by name
                loaded = manager.load_task_or_group([spec.name])
            except Exception as exc:
                raise TaskError(f"task {spec.name!r}: lm-eval could not load it: {_one_line(exc)}") from None
            task = next(iter(loaded.values()))
            if split is not None:  # the dataset holds every split; the task reads config.test_split
                splits = list(getattr(task, "dataset", None) or ())
                if splits and split not in splits:
                    raise TaskError(f"{field} {split!r}: task {spec.name!r} has no such split "
                                    f"(its splits: {', '.join(splits)})")
                task.config.test_split = split
                if heldout:
                    task.config.task = f"{spec.name}__{split}"
            built[spec.name] = task
    for spec in suite.tasks:
        apply_settings(built[spec.name], spec)
    return built


def doc_samples(suite: TaskSuite, tasks: Mapping[str, Any], heldout: bool) -> dict[str, list[int]]:
    """lm-eval's ``samples``: the documents scored per task where a limit cuts the split."""

    limit = suite.heldout_limit if heldout else suite.limit
    samples: dict[str, list[int]] = {}
    for name, task in tasks.items():
        chosen = sample_docs(len(task.eval_docs), limit, suite.sample_seed, name, task.config.test_split or "")
        if chosen is not None:
            samples[name] = chosen
    return samples


def _check_file_split(name: str, cfg: dict[str, Any], split: str | None, field: str) -> None:
    """A split of a task over local data files must be one of its files' keys (a name, not a path)."""
    files = cfg.get("dataset_kwargs", {}).get("data_files")
    if split is None or files is None:
        return
    splits = list(files) if isinstance(files, dict) else ["train"]  # datasets names a lone file list "train"
    if split not in splits:
        raise TaskError(f"{field} {split!r}: task {name!r} has no such split (its data files: {', '.join(splits)})")


def _builtin_manager(suite: TaskSuite, specs: list[TaskSpec]) -> Any:
    """lm-eval's TaskManager for tasks not found as local task files, once every name is
    known to be a task (not a group or tag, which score as several tasks)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in suite.task_paths if p.is_dir()]
    local = TaskManager(include_defaults=False, include_path=paths) if paths else None  # instant
    for spec in specs:
        if local is not None:
            _check_is_task(local, spec.name, "evaluation.task_paths")
    manager = TaskManager(include_path=paths or None)  # indexes lm-eval's ~15k built-in tasks: ~15 s
    for spec in specs:
        if spec.name not in manager.all_tasks:
            raise TaskError(f"task {spec.name!r}: unknown (not a task in evaluation.task_paths {paths} "
                            "nor one of lm-eval's tasks)")
        _check_is_task(manager, spec.name, "lm-eval")
    return manager


def _check_is_task(manager: Any, name: str, where: str) -> None:
    kind = "group" if name in manager.all_groups else "tag" if name in manager.all_tags else None
    if kind is not None:  # lm-eval would score its members under other names: no score for ``name``
        raise TaskError(f"task {name!r} is a {kind} of several tasks in {where}, not a task; "
                        "list its tasks one by one (each with its metric and weight)")


def check_suite(suite: TaskSuite, tokenizer_dir: Path | None = None, model: str = "") -> None:
    """Build every task on the search and held-out splits, as a worker will, and check that
    each configured metric is one the task reports and each setting is one lm-eval applies
    (TaskError, one line, otherwise); with ``tokenizer_dir`` (the workers' tokenizer, of
    ``model``), that it has the chat template the settings ask for."""

    for heldout in (False, True) if suite.heldout_split is not None else (False,):
        tasks = build_task_dict(suite, heldout)
        for spec in suite.tasks:
            check_metric(spec, tasks[spec.name])
            check_settings(spec, tasks[spec.name], suite.heldout_split)
    if tokenizer_dir is not None:
        check_chat_template(suite.tasks, tokenizer_dir, model)


def check_metric(spec: TaskSpec, task: Any) -> None:
    """``spec.metric`` ("acc", or "exact_match,strict-match" to name a filter) is reported by ``task``."""
    metrics = list(task.aggregation())
    filters = [f["name"] for f in task.config.filter_list] if task.config.filter_list else ["none"]
    metric, _, filt = spec.metric.partition(",")
    if metric not in metrics:
        raise TaskError(f"task {spec.name!r} has no metric {metric!r} (its metrics: {', '.join(metrics)})")
    if (filt or "none") not in filters:
        named = ", ".join(f"{metric},{f}" for f in filters)
        why = f"has no filter {filt!r}" if filt else "reports it per filter"
        raise TaskError(f"task {spec.name!r} {why} for metric {metric!r}: name one of {named}")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
