"""The search config: a YAML file, validated field by field.

Every mistake becomes a :class:`ConfigError` with one line naming the file and the field.
Relative model and task paths are resolved against the config file's folder.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError,
                      field_validator, model_validator)

from evomerge.evaluators.racing import RacingSettings
from evomerge.evaluators.settings import prompt_key
from evomerge.evaluators.spec import TaskSpec, TaskSuite
# ConfigError, read_mapping, resolve_path and check_study_name are also imported from here
from evomerge.search.config_file import ConfigError, read_mapping, resolve_path
from evomerge.search.families import AUTO, known_params
from evomerge.search.names import check_study_name
from evomerge.search.presets import apply_defaults
from evomerge.workers.layout import LayoutKind
from evomerge.workers.methods import METHODS, TRANSFORMS_DECLARED, method_spec, transform_spec
from evomerge.workers.source_spec import SourceModel


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    path: str = Field(min_length=1)


class MergeConfig(_Strict):
    # auto: the search chooses the family (search/families.py); else one declared method
    method: str = AUTO
    # genes per expert model, per group of layers, per module type, or anchors across depth;
    # auto: per model first, then per layer group once that stagnates (search/families.py)
    granularity: Literal["auto", "model", "layer_group", "module", "depth"] = "auto"
    group_size: int = Field(2, ge=1)  # layers per gene group when granularity is layer_group
    points: int = Field(3, ge=2)  # anchors across depth when granularity is depth
    transforms: list[str] = []  # task-vector transforms applied after the method, e.g. [lines]
    normalize: bool = False
    seed: int = 0  # seeds random operators (DARE, DELLA); part of every recipe, so replay is exact
    ranges: dict[str, tuple[float, float]] = {}  # per-parameter search bounds overriding the operator's
    fixed: dict[str, float] = {}  # parameters held at a value instead of searched

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method != AUTO and method not in METHODS:
            raise ValueError(f"unknown merge method {method!r} (known: auto, {', '.join(sorted(METHODS))})")
        return method

    @field_validator("transforms")
    @classmethod
    def _known_transforms(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in TRANSFORMS_DECLARED:
                raise ValueError(f"unknown transform {name!r} (known: {', '.join(sorted(TRANSFORMS_DECLARED))})")
        if len(set(names)) != len(names):
            raise ValueError(f"a transform is listed twice in {names}")
        return names

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.transforms and self.method != AUTO and not method_spec(self.method).task_vector:
            raise ValueError(f"transforms {self.transforms} act on task vectors; {self.method} is not a "
                             "task-vector method")
        known = sorted(known_params(self.method)) + [p.name for t in self.transforms for p in transform_spec(t).params]
        for name, (low, high) in self.ranges.items():
            if name not in known:
                raise ValueError(f"ranges: {self.method} has no parameter {name!r} (it has {known})")
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"ranges.{name}: need finite low < high, got [{low}, {high}]")
        for name, value in self.fixed.items():
            if name not in known:
                raise ValueError(f"fixed: {self.method} has no parameter {name!r} (it has {known})")
            if name in self.ranges:
                raise ValueError(f"fixed.{name}: also given a search range; choose one")
            if not math.isfinite(value):
                raise ValueError(f"fixed.{name}: need a finite value, got {value}")
        return self

    @property
    def layout_group_size(self) -> int | None:
        return self.group_size if self.granularity == "layer_group" else None

    @property
    def coarse_granularity(self) -> LayoutKind:
        """The layout searched first: the configured one, or (auto) one gene per expert."""
        return "model" if self.granularity == "auto" else self.granularity


class DfsConfig(_Strict):
    """Data-flow-space (layer routing) search: which models, and how the genome is laid out."""

    models: list[str] = []  # the collection, A first (embeddings, head, tokenizer); default base_model + experts
    repeats: int = Field(2, ge=1)  # r: the layout of all layers is repeated r times (paper: 3)
    block: int = Field(1, ge=1)  # layers per slot (1 = single layers)
    pin_ends: bool = True  # A's first and last layers always start and end the path
    scales: Literal["per_hop", "none"] = "per_hop"  # one scale gene per slot, or all scales 1
    scale_range: tuple[float, float] = (0.0, 2.0)
    max_hops: int | None = Field(None, ge=1)  # default: every slot on
    memory_gb: float | None = Field(None, gt=0)  # reject paths whose activations + KV cache exceed this
    max_trials: int | None = Field(None, ge=1)  # ps+dfs: the DFS stage's budget (default budget.max_trials)
    ps_study: str | None = None  # ps+dfs: take the PS model from this existing study instead of running PS

    @model_validator(mode="after")
    def _check(self) -> "DfsConfig":
        low, high = self.scale_range
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high):
            raise ValueError(f"scale_range: need finite 0 <= low < high, got [{low}, {high}]")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: duplicate names in {self.models}")
        return self


class OptimizerConfig(_Strict):
    # cma: CMA-ES with IPOP restarts; random: uniform in the box (the baseline); tpe, gp:
    # Optuna's samplers; nsga2: one objective per task, a Pareto front (search.optimizers)
    name: Literal["cma", "random", "tpe", "gp", "nsga2"] = "cma"
    popsize: int | None = Field(None, ge=2)  # default 4 + floor(3 ln n), as in pycma and the paper
    sigma0: float = Field(1 / 6, gt=0, le=1)  # in the unit box (Sakana: 1/6)
    init: float = Field(0.5, ge=0, le=1)  # every gene starts here (Sakana: 0.5)
    # best_baseline: start from the best baseline that lies in the search space (the
    # untuned merge, the probes); init: from every gene at ``init`` (Sakana)
    start: Literal["best_baseline", "init"] = "best_baseline"
    restarts: int = Field(9, ge=0)  # cma: IPOP restarts (population doubled each time) at most
    seed: int = 0
    # separable CMA-ES (diagonal covariance): O(n) per update instead of O(n^2) and learns
    # n times faster per generation; the default for DFS's hundreds of genes (None = auto)
    diagonal: bool | None = None

    @model_validator(mode="after")
    def _cma_population(self) -> "OptimizerConfig":
        if self.name == "cma" and self.popsize is not None and self.popsize < 3:
            raise ValueError(f"popsize {self.popsize}: CMA-ES needs a population of at least 3")
        return self


# Numbers are strict (StrictInt, StrictFloat): YAML's `true` is not 1, nor 2.0 a count of workers.
SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a dataset split is a name, never a path


class GenerationKwargs(_Strict):
    """Overrides of a generate_until task's generation kwargs (docs/evaluation.md)."""

    until: str | list[str] | None = None
    max_gen_toks: StrictInt | None = Field(None, ge=1)
    do_sample: StrictBool | None = None
    temperature: StrictFloat | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _greedy(self) -> "GenerationKwargs":
        if self.do_sample or (self.temperature or 0) > 0:  # duplicates are scored once; CMA-ES ranks
            raise ValueError("sampling makes a candidate's score random; only greedy decoding is allowed "
                             "(do_sample: false, temperature: 0)")
        return self


class TaskEntry(_Strict):
    name: str = Field(min_length=1)
    metric: str = "acc"  # or "metric,filter" for a task with several filters
    weight: StrictFloat = Field(1.0, gt=0)
    # None: the evaluation-wide setting (docs/evaluation.md)
    num_fewshot: StrictInt | None = Field(None, ge=0)
    apply_chat_template: StrictBool | None = None
    system_instruction: str | None = Field(None, min_length=1)
    fewshot_as_multiturn: StrictBool | None = None
    generation_kwargs: GenerationKwargs | None = None


_RACING = RacingSettings()  # the racing defaults, defined once with the rule they parametrise


class RacingConfig(_Strict):
    """``evaluation.racing``: multi-fidelity scoring (evomerge.evaluators.racing), with the
    bounds users may set; the defaults are RacingSettings' (measured: docs/evaluation.md).
    Off by default: a stopped candidate's stored fitness is an estimate from part of its
    documents."""

    enabled: StrictBool = _RACING.enabled
    fraction: StrictFloat = Field(_RACING.fraction, gt=0, lt=1)  # of each task's documents in the first stage
    confidence: StrictFloat = Field(_RACING.confidence, ge=0.5, lt=1)  # one-sided, per task (0.5: the estimate decides)
    min_documents: StrictInt = Field(_RACING.min_documents, ge=1)  # tasks with a smaller first stage are scored in full
    keep: StrictFloat = Field(_RACING.keep, gt=0, le=1)  # share of a generation finished (0.5: CMA-ES's parents)
    stages: StrictInt = Field(_RACING.stages, ge=2, le=8)  # growing geometrically from ``fraction`` to every document


class EvaluationConfig(_Strict):
    task_paths: list[str] = []
    tasks: list[TaskEntry] = Field(min_length=1)
    search_split: str | None = None
    heldout_split: str | None = None
    limit: StrictInt | None = Field(None, ge=1)  # search documents per task: a seeded sample, fixed per study
    heldout_limit: StrictInt | None = Field(None, ge=1)  # held-out documents per task (None: all)
    sample_seed: StrictInt = 0  # draws both samples
    racing: RacingConfig = RacingConfig()
    num_fewshot: StrictInt | None = Field(None, ge=0)  # None: each task's own
    apply_chat_template: StrictBool = False
    system_instruction: str | None = Field(None, min_length=1)
    fewshot_as_multiturn: StrictBool = False
    heldout_top_k: StrictInt = Field(3, ge=0)
    # auto: the largest batch that fits, found per task on a GPU; CPU_BATCH on the CPU
    # (evaluators/batching.py). An int: that batch, as before.
    batch_size: StrictInt | Literal["auto"] = "auto"

    def spec(self, task: TaskEntry) -> TaskSpec:
        """``task`` with the evaluation-wide settings filled in where it sets none."""
        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        gen = task.generation_kwargs.model_dump(exclude_none=True) if task.generation_kwargs else {}
        return TaskSpec(task.name, task.metric, task.weight, pick(task.num_fewshot, self.num_fewshot),
                        pick(task.apply_chat_template, self.apply_chat_template),
                        pick(task.system_instruction, self.system_instruction),
                        pick(task.fewshot_as_multiturn, self.fewshot_as_multiturn), gen)

    @model_validator(mode="after")
    def _check_settings(self) -> "EvaluationConfig":
        seen: dict[str, TaskSpec] = {}
        for i, task in enumerate(self.tasks):
            spec = self.spec(task)
            if spec.fewshot_as_multiturn and not spec.apply_chat_template:
                raise ValueError(f"tasks[{i}] {task.name!r}: fewshot_as_multiturn needs apply_chat_template: true")
            other = seen.setdefault(task.name, spec)
            if (other.num_fewshot, other.generation_kwargs, *prompt_key(other)) != \
                    (spec.num_fewshot, spec.generation_kwargs, *prompt_key(spec)):
                raise ValueError(f"tasks[{i}] {task.name!r}: listed twice with different settings")
        return self

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        # one message for the union (pydantic would report each member's failure apart)
        if value == "auto" or (type(value) is int and value >= 1):
            return value
        raise ValueError(f"Input should be a valid batch size: an integer >= 1 or 'auto', not {value!r}")

    @field_validator("search_split", "heldout_split")
    @classmethod
    def _split_name(cls, split: str | None) -> str | None:
        if split is not None and not SPLIT_NAME.fullmatch(split):
            raise ValueError(f"{split!r} is not a split name (letters, digits, '_', '.', '-'; not a path)")
        return split


class BudgetConfig(_Strict):
    max_trials: int = Field(100, ge=1)
    timeout_s: float | None = Field(None, gt=0)


class WorkersConfig(_Strict):
    count: StrictInt = Field(1, ge=1)
    num_gpus: StrictFloat = Field(0, ge=0)  # per worker: 1 on a GPU cluster
    num_cpus: StrictFloat = Field(1, gt=0)
    threads: StrictInt = Field(1, ge=1)  # torch threads per worker
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # where a GPU worker keeps the source models: on the GPU, or in host memory (shared by the
    # node's workers) streamed to the GPU tensor by tensor; auto: the GPU when they fit there
    sources: Literal["auto", "device", "host"] = "auto"
    max_attempts: StrictInt = Field(2, ge=1)  # a candidate whose worker dies is retried up to this
    # Seconds one evaluation may run before its worker counts as hung (killed, replaced, the
    # candidate retried). None: derived from finished jobs (workers/pool.py JobTimeout).
    job_timeout_s: StrictFloat | None = Field(None, gt=0)


class TrackingConfig(_Strict):
    """Optional logging of every candidate to MLflow (search/app/tracking.py); off by default."""

    backend: Literal["none", "mlflow"] = "none"
    uri: str = Field("sqlite:///mlflow.db", min_length=1)  # an MLflow tracking URI; a SQLite file works offline
    experiment: str | None = Field(None, min_length=1)  # None: the study's name

    @field_validator("backend")
    @classmethod
    def _installed(cls, backend: str) -> str:
        import importlib.util

        if backend == "mlflow" and importlib.util.find_spec("mlflow") is None:
            raise ValueError("mlflow is not installed: pip install 'evomerge[tracking]'")
        return backend


class SearchConfig(_Strict):
    study: str = Field("evomerge", min_length=1)
    preset: Literal["sakana"] | None = None  # fills in what the config leaves out (search/presets.py)
    models: list[ModelEntry] = Field(min_length=2)
    base_model: str
    space: Literal["ps", "dfs", "ps+dfs"] = "ps"
    merge: MergeConfig = MergeConfig()
    dfs: DfsConfig = DfsConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    evaluation: EvaluationConfig
    budget: BudgetConfig = BudgetConfig()
    workers: WorkersConfig = WorkersConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("study")
    @classmethod
    def _study_name(cls, name: str) -> str:
        return check_study_name(name)

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        if self.base_model not in names:
            raise ValueError(f"base_model {self.base_model!r} is not one of the models {names}")
        if "ps" in names and self.space == "ps+dfs":
            raise ValueError("models: 'ps' names the PS model of a ps+dfs search; rename that model")
        allowed = names + (["ps"] if self.space == "ps+dfs" else [])
        unknown = [m for m in self.dfs.models if m not in allowed]
        if unknown:
            raise ValueError(f"dfs.models: {unknown[0]!r} is not one of the models {allowed}")
        return self


    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.models if m.name != self.base_model)

    def sources(self) -> list[SourceModel]:
        return [SourceModel(m.name, m.path) for m in self.models]

    def suite(self) -> TaskSuite:
        ev = self.evaluation
        return TaskSuite(tuple(ev.spec(t) for t in ev.tasks), tuple(Path(p) for p in ev.task_paths),
                         ev.search_split, ev.heldout_split, ev.limit, ev.heldout_limit, ev.sample_seed,
                         RacingSettings(**ev.racing.model_dump()))

    def identity_json(self) -> str:
        """What a study is defined by: a resumed search must not change these."""
        return self.model_dump_json(include={
            "models": True, "base_model": True, "space": True, "merge": True, "optimizer": True,
            "dfs": {"models", "repeats", "block", "pin_ends", "scales", "scale_range", "max_hops", "memory_gb",
                    "ps_study"},
            "evaluation": {"tasks", "search_split", "heldout_split", "limit", "heldout_limit", "sample_seed",
                           "num_fewshot", "apply_chat_template", "system_instruction", "fewshot_as_multiturn"}})


def stored_config(config_json: str, study: str) -> SearchConfig:
    """The config a study was started with, as stored in its database row."""
    try:
        return SearchConfig.model_validate_json(config_json)
    except ValidationError as exc:
        raise ConfigError(f"the stored config of study {study!r} does not validate (written by another "
                          f"evomerge version?): {_describe(exc)}") from None


def format_validation_error(file: Path, exc: ValidationError) -> str:
    return f"config error in {file}: {_describe(exc)}"


def _describe(exc: ValidationError) -> str:
    """The first error as "field.path: why" (and how many more)."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {msg}{more}"


def load_config(file: str | Path) -> SearchConfig:
    """Read, validate and resolve a search config."""
    file = Path(file)
    raw = apply_defaults(read_mapping(file, "config"))
    try:
        cfg = SearchConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(file, exc)) from None
    # Checked for configs read from a file only: a study stored before this rule still replays.
    if cfg.space == "ps+dfs" and cfg.dfs.models and "ps" not in cfg.dfs.models:
        raise ConfigError(f"config error in {file}: dfs.models: a ps+dfs search routes over its PS model; add "
                          f"'ps' to {list(cfg.dfs.models)} (first, to use its embeddings and head) or leave it out")
    folder = file.resolve().parent
    models = [ModelEntry(name=m.name, path=resolve_path(m.path, folder, hub_like=True)) for m in cfg.models]
    paths = [resolve_path(p, folder, hub_like=False) for p in cfg.evaluation.task_paths]
    evaluation = cfg.evaluation.model_copy(update={"task_paths": paths})
    return cfg.model_copy(update={"models": models, "evaluation": evaluation})
