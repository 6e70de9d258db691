"""The Recipe: a frozen, JSON-serialisable description of one candidate model.

A recipe crosses every boundary of the service (controller -> worker -> database ->
replay), so it is a value: immutable, versioned, with a stable content hash that the
controller uses to evaluate identical candidates only once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

SCHEMA_VERSION = 1


class Recipe(BaseModel):
    """One candidate.

    ``kind="source"`` is a source model evaluated as it is (the leaderboard's baselines).
    ``kind="merge"`` applies the operator ``method`` to ``base`` and the expert ``models``;
    ``params[param][model]`` holds one value per gene group: a single value when genes
    are per model, else one per layer group followed by one for the non-layer tensors
    (embeddings, final norm, head).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["source", "merge"]
    source: str | None = None
    method: str | None = None
    base: str | None = None
    models: tuple[str, ...] = ()
    params: dict[str, dict[str, tuple[float, ...]]] = {}
    group_size: int | None = None  # layers per gene group; None = one gene per model
    normalize: bool = False
    seed: int = 0
    label: str = ""  # human label such as "untuned merge"; not part of the identity

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.kind == "source":
            if not self.source:
                raise ValueError("a source recipe names its source model")
            return self
        if not self.method or not self.base or not self.models:
            raise ValueError("a merge recipe names its method, base and expert models")
        for name, per_model in self.params.items():
            if set(per_model) != set(self.models):
                raise ValueError(f"parameter {name!r} must give values for exactly {list(self.models)}")
            lengths = {len(v) for v in per_model.values()}
            if len(lengths) != 1 or 0 in lengths:
                raise ValueError(f"parameter {name!r} has ragged or empty gene groups")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): the stored form."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.model_validate(json.loads(text))

    @property
    def content_hash(self) -> str:
        """SHA-256 of what defines the merged weights (the label is excluded)."""
        identity = self.model_dump(mode="json", exclude={"label"})
        blob = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def value(self, param: str, model: str, group: int) -> float:
        """The value of ``param`` for expert ``model`` in gene group ``group``."""
        values = self.params[param][model]
        return values[0] if len(values) == 1 else values[group]

    def summary(self) -> str:
        """A short human-readable line for leaderboards."""
        if self.kind == "source":
            return f"source {self.source}"
        parts = []
        for model in self.models:
            vals = " ".join(
                f"{p[0]}={_fmt(self.params[p][model])}" for p in sorted(self.params)
            )
            parts.append(f"{model}({vals})")
        head = f"{self.label}: " if self.label else ""
        return f"{head}{self.method} " + " ".join(parts)


def _fmt(values: tuple[float, ...]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return "[" + ",".join(f"{v:.2f}" for v in values) + "]"
