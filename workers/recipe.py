"""The Recipe: a frozen, JSON-serialisable description of one candidate model.

A recipe crosses every boundary of the service (controller -> worker -> database ->
replay), so it is a value: immutable, versioned, with a stable content hash that the
controller uses to evaluate identical candidates only once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from evomerge.workers import recipe_text
from evomerge.workers.layout import LayoutKind
from evomerge.workers.methods import method_spec, transform_spec

SCHEMA_VERSION = 2


class Recipe(BaseModel):
    """One candidate.

    ``kind="source"`` is a source model evaluated as it is (the leaderboard's baselines).
    ``kind="route"`` is a data-flow-space model (:mod:`workers.routing`): ``models`` is the
    collection (the first, also ``base``, gives embeddings, final norm, head and tokenizer),
    ``route`` the hops (model, layer), ``scales`` one per hop, and ``members`` the recipes of
    collection models that are merges themselves (PS+DFS: the evolved PS model).
    ``kind="merge"`` applies the operator ``method`` to ``base`` and the expert ``models``,
    then the ``transforms`` (e.g. LiNeS) in order. ``params[param][model]`` holds an
    expert's values of a per-expert parameter, ``shared[param]`` those of a parameter with
    one value per merge; ``layout`` says which value governs which tensor
    (:mod:`workers.layout`); a single value is a constant.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[2] = SCHEMA_VERSION
    kind: Literal["source", "merge", "route"]
    source: str | None = None
    method: str | None = None
    base: str | None = None
    models: tuple[str, ...] = ()
    params: dict[str, dict[str, tuple[float, ...]]] = {}
    shared: dict[str, tuple[float, ...]] = {}
    transforms: tuple[str, ...] = ()
    layout: LayoutKind = "model"
    group_size: int | None = None  # layers per group under the layer_group layout
    normalize: bool = False
    seed: int = 0
    route: tuple[tuple[str, int], ...] = ()
    scales: tuple[float, ...] = ()
    members: dict[str, "Recipe"] = {}
    label: str = ""  # human label such as "untuned merge"; not part of the identity

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Schema 1 had no layout: a group size meant layer groups."""
        if isinstance(data, dict) and data.get("schema_version") == 1:
            data = {**data, "schema_version": SCHEMA_VERSION}
            if data.get("group_size") is not None:
                data["layout"] = "layer_group"
        return data

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.kind == "source":
            if not self.source:
                raise ValueError("a source recipe names its source model")
            return self
        if self.kind == "route":
            if not self.models or self.base != self.models[0]:
                raise ValueError("a route recipe names its collection of models, the first being its base")
            if len(self.scales) != len(self.route):
                raise ValueError(f"a route of {len(self.route)} hops needs as many scales, got {len(self.scales)}")
            unknown = [m for m, _ in self.route if m not in self.models]
            if unknown:
                raise ValueError(f"route hop names model {unknown[0]!r}, not in the collection {list(self.models)}")
            return self
        if not self.method or not self.base or not self.models:
            raise ValueError("a merge recipe names its method, base and expert models")
        if self.layout == "layer_group" and not (self.group_size and self.group_size >= 1):
            raise ValueError("a layer_group layout needs group_size >= 1")
        for name, per_model in self.params.items():
            if set(per_model) != set(self.models):
                raise ValueError(f"parameter {name!r} must give values for exactly {list(self.models)}")
            lengths = {len(v) for v in per_model.values()}
            if 0 in lengths or (len(lengths - {1}) > 1 and self.layout != "depth"):
                raise ValueError(f"parameter {name!r} has ragged or empty gene groups")
        for name, values in self.shared.items():
            if not values:
                raise ValueError(f"parameter {name!r} has no value")
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

    def summary(self) -> str:
        """A short human-readable line for leaderboards (:func:`workers.recipe_text.summary`)."""
        return recipe_text.summary(self.model_dump())

    def path_text(self, decimals: int = 2) -> str:
        """``A0 A1 B2×0.83 ...``: each hop as its model's letter (order of ``models``) and layer,
        with its scale where it is not 1."""
        return recipe_text.path_text(self.models, self.route, self.scales, decimals)


Recipe.model_rebuild()


def complete(recipe: Recipe) -> Recipe:
    """``recipe`` with every parameter it omits set to its declared default."""
    if recipe.kind != "merge":
        return recipe
    op = method_spec(recipe.method or "")
    params = {k: dict(v) for k, v in recipe.params.items()}
    shared = dict(recipe.shared)
    specs = [*op.params, *(p for t in recipe.transforms for p in transform_spec(t).params)]
    for spec in specs:
        if spec.per_expert:
            for model in recipe.models:
                params.setdefault(spec.name, {}).setdefault(model, (spec.default,))
        else:
            shared.setdefault(spec.name, (spec.default,))
    return recipe.model_copy(update={"params": params, "shared": shared})


def check_recipe(recipe: Recipe) -> None:
    """Refuse a merge recipe its operator cannot run: wrong expert count, missing parameters,
    or a transform on a method that is not task arithmetic over a base (ValueError, one line)."""
    op = method_spec(recipe.method or "")
    op.check_experts(len(recipe.models))
    for spec in op.params:
        have = spec.name in (recipe.params if spec.per_expert else recipe.shared)
        if not have:
            where = "params" if spec.per_expert else "shared"
            raise ValueError(f"recipe for {op.name} lacks {where} parameter {spec.name!r}")
    for name in recipe.transforms:
        transform = transform_spec(name)
        if not op.task_vector:
            raise ValueError(f"transform {name} needs a task-vector method, not {op.name}")
        for spec in transform.params:
            if spec.name not in recipe.shared:
                raise ValueError(f"recipe lacks shared parameter {spec.name!r} of transform {name}")
