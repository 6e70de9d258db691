"""The recipe: a frozen, JSON-serialisable description of one candidate model.

A recipe crosses every boundary of the service (controller -> worker -> database ->
replay), so it is a value: immutable, versioned, with a stable content hash that the
controller uses to evaluate identical candidates only once. It is one of three typed
variants, told apart by ``kind``: a source evaluated as it is, a merge of sources, or a
route through the layers of a collection of models (data-flow space).

The stored form is schema 2's single document: every field of every variant, those a
variant does not have at their defaults. So the canonical JSON and the content hash of a
recipe are those it had when one class held all three kinds (tested on the 0.1.0
database), and every stored study reads unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from evomerge.workers import recipe_text
from evomerge.workers.layout import LayoutKind
from evomerge.workers.methods import method_spec, transform_spec

SCHEMA_VERSION = 2

# Schema 2's fields with their defaults: what a variant that lacks a field stores for it.
_STORED_DEFAULTS: dict[str, Any] = {
    "source": None, "method": None, "base": None, "models": [], "params": {}, "shared": {}, "transforms": [],
    "layout": "model", "group_size": None, "normalize": False, "seed": 0, "route": [], "scales": [],
    "members": {}, "label": "",
}


class _Variant(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[2] = SCHEMA_VERSION
    label: str = ""  # human label such as "untuned merge"; not part of the identity

    @model_validator(mode="before")
    @classmethod
    def _read_stored(cls, data: Any) -> Any:
        """Schema 1 had no layout (a group size meant layer groups); the stored document
        holds the other variants' fields at their defaults, which this variant drops."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("schema_version") == 1:
            data["schema_version"] = SCHEMA_VERSION
            if data.get("group_size") is not None:
                data["layout"] = "layer_group"
        for name, default in _STORED_DEFAULTS.items():
            if name not in cls.model_fields and name in data and _same(data[name], default):
                del data[name]
        return data

    def stored(self) -> dict[str, Any]:
        """The schema-2 document of this recipe (JSON types)."""
        return {**_STORED_DEFAULTS, **self.model_dump(mode="json")}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace): the stored form."""
        return json.dumps(self.stored(), sort_keys=True, separators=(",", ":"))

    @property
    def content_hash(self) -> str:
        """SHA-256 of what defines the merged weights (the label is excluded)."""
        identity = {k: v for k, v in self.stored().items() if k != "label"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def summary(self) -> str:
        """A short human-readable line for leaderboards (:func:`workers.recipe_text.summary`)."""
        return recipe_text.summary(self.stored())

    def sources(self) -> tuple[str, ...]:
        """The source models whose weights this recipe reads, head first."""
        raise NotImplementedError  # each variant says


def _same(value: Any, default: Any) -> bool:
    return value == default or (isinstance(default, list) and value == tuple(default))


class SourceRecipe(_Variant):
    """A source model evaluated as it is (the leaderboard's baselines)."""

    kind: Literal["source"] = "source"
    source: str = Field(min_length=1)

    def sources(self) -> tuple[str, ...]:
        return (self.source,)


class MergeRecipe(_Variant):
    """The operator ``method`` applied to ``base`` and the expert ``models``, then the
    ``transforms`` (e.g. LiNeS) in order. ``params[param][model]`` holds an expert's values
    of a per-expert parameter, ``shared[param]`` those of a parameter with one value per
    merge; ``layout`` says which value governs which tensor (:mod:`workers.layout`); a
    single value is a constant. Built complete: every parameter the method and transforms
    declare is present (omitted ones take their declared default), and checked against
    the declarations (expert count, transforms on task-vector methods) once, here.
    """

    kind: Literal["merge"] = "merge"
    method: str = Field(min_length=1)
    base: str = Field(min_length=1)
    models: tuple[str, ...] = Field(min_length=1)
    params: dict[str, dict[str, tuple[float, ...]]] = {}
    shared: dict[str, tuple[float, ...]] = {}
    transforms: tuple[str, ...] = ()
    layout: LayoutKind = "model"
    group_size: int | None = None  # layers per group under the layer_group layout
    normalize: bool = False
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _complete(cls, data: Any) -> Any:
        """Fill the parameters the recipe omits with their declared defaults."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            return data
        try:
            op = method_spec(data["method"])
            transforms = [transform_spec(t) for t in data.get("transforms") or ()]
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        models = tuple(data.get("models") or ())
        params = {k: dict(v) for k, v in (data.get("params") or {}).items()}
        shared = dict(data.get("shared") or {})
        specs = [*op.params, *(p for t in transforms for p in t.params)]
        for spec in specs:
            if spec.per_expert:
                for model in models:
                    params.setdefault(spec.name, {}).setdefault(model, (spec.default,))
            else:
                shared.setdefault(spec.name, (spec.default,))
        return {**data, "params": params, "shared": shared}

    @model_validator(mode="after")
    def _check(self) -> "MergeRecipe":
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
        op = method_spec(self.method)
        op.check_experts(len(self.models))
        for name in self.transforms:
            if not op.task_vector:
                raise ValueError(f"transform {name} needs a task-vector method, not {op.name}")
        return self

    def sources(self) -> tuple[str, ...]:
        return (self.base, *self.models)


class RouteRecipe(_Variant):
    """A data-flow-space model (:mod:`workers.routing`): ``models`` is the collection (the
    first, also ``base``, gives embeddings, final norm, head and tokenizer), ``route`` the
    hops (model, layer), ``scales`` one per hop, and ``members`` the recipes of collection
    models that are merges themselves (PS+DFS: the evolved PS model)."""

    kind: Literal["route"] = "route"
    base: str = Field(min_length=1)
    models: tuple[str, ...] = Field(min_length=1)
    route: tuple[tuple[str, int], ...] = ()
    scales: tuple[float, ...] = ()
    members: dict[str, "Recipe"] = {}

    @model_validator(mode="after")
    def _check(self) -> "RouteRecipe":
        if self.base != self.models[0]:
            raise ValueError("a route recipe names its collection of models, the first being its base")
        if len(self.scales) != len(self.route):
            raise ValueError(f"a route of {len(self.route)} hops needs as many scales, got {len(self.scales)}")
        unknown = [m for m, _ in self.route if m not in self.models]
        if unknown:
            raise ValueError(f"route hop names model {unknown[0]!r}, not in the collection {list(self.models)}")
        return self

    def stored(self) -> dict[str, Any]:
        return {**super().stored(), "members": {k: m.stored() for k, m in self.members.items()}}

    def head(self) -> Recipe:
        """The recipe of the model whose embeddings, norm and head the route runs on."""
        return self.members.get(self.base) or SourceRecipe(source=self.base)

    def collection(self) -> RouteRecipe:
        """This route without its hops: what its layer stacks are built from."""
        return RouteRecipe(base=self.base, models=self.models, members=self.members)

    def sources(self) -> tuple[str, ...]:
        used = [s for m in self.models for s in (self.members[m].sources() if m in self.members else (m,))]
        return tuple(dict.fromkeys(used))

    def path_text(self, decimals: int = 2) -> str:
        """``A0 A1 B2×0.83 ...``: each hop as its model's letter (order of ``models``) and layer,
        with its scale where it is not 1."""
        return recipe_text.path_text(self.models, self.route, self.scales, decimals)


Recipe = Annotated[Union[SourceRecipe, MergeRecipe, RouteRecipe], Field(discriminator="kind")]
"""Any candidate: one of the three variants, read from its stored form by :func:`parse_recipe`."""

_ADAPTER: TypeAdapter[Recipe] = TypeAdapter(Recipe)
RouteRecipe.model_rebuild()


def parse_recipe(text: str) -> Recipe:
    """The recipe stored as ``text`` (its canonical JSON, or any JSON of schema 1 or 2)."""
    return _ADAPTER.validate_json(text)


def recipe_from(data: dict[str, Any]) -> Recipe:
    """The recipe of a schema 1 or 2 document already parsed from JSON or YAML."""
    return _ADAPTER.validate_python(data)
