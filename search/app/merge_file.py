"""``evomerge merge``: one merge, no search, from an evomerge merge file or a mergekit YAML.

An evomerge merge file names the source folders and carries a recipe (the same JSON as a
replayed folder's ``evomerge_recipe.json``)::

    models:
      - {name: base, path: models/base}
      - {name: math, path: models/math}
    recipe: {kind: merge, method: ties, base: base, models: [math],
             params: {density: {math: [0.5]}, weight: {math: [1.0]}}}
    dtype: float32          # optional
    tokenizer_source: base  # optional: the source whose tokenizer is written

Parameters the recipe omits take their declared defaults. A file with ``merge_method``
at the top is read as a mergekit config (:mod:`workers.mergekit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from evomerge.search.config import ModelEntry, format_validation_error
from evomerge.search.config_file import ConfigError, read_mapping, resolve_path
from evomerge.workers.mergekit import DTYPES, MergeJob, MergekitConfigError, from_mergekit
from evomerge.workers.recipe import Recipe


class MergeFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry]
    recipe: Recipe
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer_source: str | None = None


def load_merge_file(file: str | Path) -> MergeJob:
    """Read and check a merge file of either kind (ConfigError, one line, on any mistake)."""
    file = Path(file)
    raw = read_mapping(file, "merge file")
    folder = file.resolve().parent
    if "merge_method" in raw:
        try:
            job = from_mergekit(raw, folder)
        except MergekitConfigError as exc:  # its message may quote the user's values: keep one short line
            raise ConfigError(f"{file}: {_short(str(exc))}") from None
    else:
        try:
            spec = MergeFile.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(file, exc)) from None
        names = [m.name for m in spec.models]
        job = MergeJob({m.name: resolve_path(m.path, folder, hub_like=True) for m in spec.models},
                       spec.recipe, spec.dtype, spec.tokenizer_source)  # completed and checked when read
        used = list(job.recipe.sources())
        unknown = [n for n in used + [spec.tokenizer_source or names[0]] if n not in names]
        if unknown:
            raise ConfigError(f"merge file {file}: recipe names model {unknown[0]!r}, not among models {names}")
    if job.dtype not in DTYPES:
        raise ConfigError(f"merge file {file}: dtype {job.dtype!r} is not supported")
    return job


def _short(text: str, limit: int = 300) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else f"{one[:limit]}... ({len(one)} characters)"
