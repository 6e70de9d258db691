"""The value types of evaluation: which tasks a study scores, how, and where they live.

Torch- and lm-eval-free, so the search core and the config read them without importing a
model library; evomerge.evaluators.tasks builds them into lm-eval tasks on a worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.evaluators.racing import RacingSettings


class TaskError(ValueError):
    """A task cannot be found or built; the message is one line."""


@dataclass(frozen=True)
class TaskSpec:
    """One scored task: lm-eval task name, the metric read from its results, its weight, and
    how its prompts are built (evomerge.evaluators.settings; the config resolves the
    evaluation-wide defaults into each task)."""

    name: str
    metric: str = "acc"
    weight: float = 1.0
    num_fewshot: int | None = None  # None: the task's own (0 if it has none)
    apply_chat_template: bool = False
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    generation_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)  # over the task's own


@dataclass(frozen=True)
class TaskSuite:
    """The tasks of a study and where to find them."""

    tasks: tuple[TaskSpec, ...]
    task_paths: tuple[Path, ...] = ()
    search_split: str | None = None  # None: the task's own test_split
    heldout_split: str | None = None
    limit: int | None = None  # documents per task on the search split (None: all), a seeded sample
    heldout_limit: int | None = None  # the same on the held-out split
    sample_seed: int = 0  # draws the sampled documents: stored with the study, so fixed for it
    racing: RacingSettings = RacingSettings()  # multi-fidelity scoring of the search split
