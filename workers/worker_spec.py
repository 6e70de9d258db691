"""What a worker needs to start: a value the controller builds and Ray carries to the worker.

Torch-free on purpose: the controller builds it and creates the actors (workers/pool.py), and
never imports the worker's engine (torch's models, transformers', lm-eval) itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evomerge.evaluators.batching import BatchSize
from evomerge.evaluators.spec import TaskSuite


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start: sources, tasks, device settings."""

    folders: Mapping[str, Path]
    base: str
    suite: TaskSuite
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: BatchSize = "auto"  # or a fixed batch (evaluators/batching.py)
    threads: int = 1
    allow_pickle: bool = False  # read .bin/.pt checkpoints (the user's explicit --allow-pickle)
    sources: Literal["auto", "device", "host"] = "auto"  # where the sources live (workers/materialize.py)
