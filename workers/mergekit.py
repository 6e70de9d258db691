"""mergekit configs <-> evomerge recipes (the common subset).

Import: a mergekit YAML (``merge_method``, ``base_model``, ``models`` with ``parameters``,
top-level ``parameters``, ``dtype``, ``tokenizer_source``) becomes a :class:`MergeJob`.
Scalars are constants; numeric lists are mergekit "gradients" (anchors spread over the
layers, interpolated linearly; non-layer tensors take the first anchor), which is our
``depth`` layout; ``filter`` lists on ``self_attn`` / ``mlp`` plus a fallback are our
``module`` layout. Anything else is refused with a one-line error naming the field.

Export: a PS recipe becomes the mergekit config of the same model, where one exists.
Parameter names follow the registry; mergekit calls our ``scale`` ``lambda``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evomerge.workers.methods import method_spec
from evomerge.workers.recipe import MergeRecipe, Recipe

# Methods both libraries implement, with mergekit's default for ``normalize``.
SHARED_METHODS = {"linear": True, "task_arithmetic": False, "ties": True, "dare_linear": False,
                  "dare_ties": False, "breadcrumbs": False, "breadcrumbs_ties": False, "della": True,
                  "della_linear": False, "slerp": False, "model_stock": False}
RANDOM_NOTE = ("random masks: mergekit draws its own (unseeded) masks and rescales survivors to the "
               "task vector's L1 norm; evomerge rescales each by 1/p (the paper's DARE/DELLA). "
               "Same model in expectation, not bit for bit.")
_ALIASES = {"lambda": "scale"}  # mergekit name -> ours
_IGNORED = {"int8_mask"}  # memory/speed switches of mergekit that do not change the result
DTYPES = ("float32", "bfloat16", "float16")


class MergekitConfigError(ValueError):
    """A mergekit config outside the supported subset, or a recipe with no mergekit equivalent."""


@dataclass(frozen=True)
class MergeJob:
    """One merge without a search: source folders by name, the recipe, and output options."""

    sources: dict[str, str]
    recipe: Recipe
    dtype: str = "float32"
    tokenizer_source: str | None = None  # a source name; None = the recipe's base
    warnings: tuple[str, ...] = ()  # settings accepted but without effect (as in mergekit)


def _fail(where: str, why: str) -> MergekitConfigError:
    return MergekitConfigError(f"mergekit config {where}: {why}")


def _model_path(ref: Any, where: str) -> str:
    if isinstance(ref, str) and ref:
        return ref
    if isinstance(ref, Mapping) and set(ref) <= {"model"} and isinstance(ref.get("model"), str):
        return ref["model"]  # {model: path}; LoRA references and revisions are not supported
    raise _fail(where, f"unsupported model reference {ref!r} (give a folder path)")


def _names(paths: list[str]) -> dict[str, str]:
    """Path -> a short unique model name (the folder's name)."""
    out: dict[str, str] = {}
    for path in paths:
        if path in out:
            continue
        stem = "".join(c if c.isalnum() or c in "_.-" else "_" for c in Path(path.rstrip("/")).name) or "model"
        name, i = stem, 2
        while name in out.values():
            name, i = f"{stem}_{i}", i + 1
        out[path] = name
    return out


def _setting(value: Any, where: str) -> tuple[str, tuple[float, ...]]:
    """A mergekit parameter value -> (layout it needs, values in that layout)."""
    if isinstance(value, bool) or value is None:
        raise _fail(where, f"expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return "model", (float(value),)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
        return ("depth" if len(value) > 1 else "model"), tuple(float(v) for v in value)
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        entries = []
        for entry in value:
            if set(entry) - {"filter", "value"} or not isinstance(entry.get("value"), (int, float)):
                raise _fail(where, "filter entries need a numeric value (gradients inside filters are not supported)")
            key = entry.get("filter")
            if key not in (None, "*", "self_attn", "mlp"):
                raise _fail(where, f"filter {key!r} is not supported (only self_attn, mlp and a fallback)")
            entries.append((key, float(entry["value"])))

        def first(module: str | None) -> float:  # mergekit: the first entry that matches wins
            for key, val in entries:
                if key in (None, "*") or key == module:
                    return val
            raise _fail(where, "a filter list needs a fallback entry without a filter")

        return "module", (first("self_attn"), first("mlp"), first(None))
    raise _fail(where, f"unsupported value {value!r}")


def from_mergekit(raw: Mapping[str, Any], folder: Path) -> MergeJob:
    """Translate a parsed mergekit YAML into a merge job (paths relative to ``folder``)."""
    allowed = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
    for key in raw:
        if key not in allowed:
            raise _fail(key, "field not supported by evomerge merge (supported: " + ", ".join(sorted(allowed)) + ")")
    method = raw.get("merge_method")
    if method not in SHARED_METHODS:
        raise _fail("merge_method", f"{method!r} is not supported (supported: {', '.join(SHARED_METHODS)})")
    entries = raw.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise _fail("models", "need a list of {model: path, parameters: {...}}")
    base_path = _model_path(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    paths = [_model_path(e.get("model") if isinstance(e, Mapping) else None, f"models[{i}]")
             for i, e in enumerate(entries)]
    names = _names(([base_path] if base_path else []) + paths)
    base = names[base_path] if base_path else names[paths[0]]
    if method != "linear" and base_path is None:
        raise _fail("base_model", f"{method} needs a base_model")
    if method == "linear" and base_path is not None and base_path not in paths:
        raise _fail("base_model", "linear weights every input: list the base model under models with a weight")
    read = _Settings(method)
    experts = read.models(entries, paths, names, base_path)
    normalize = read.shared(raw.get("parameters") or {}, experts, SHARED_METHODS[method])
    read.fill_defaults(experts)
    dtype = str(raw.get("dtype") or "float32")
    if dtype not in DTYPES:
        raise _fail("dtype", f"{dtype!r} is not supported ({', '.join(DTYPES)})")
    if raw.get("out_dtype") not in (None, dtype):
        raise _fail("out_dtype", "must equal dtype (evomerge computes and writes in one dtype)")
    sources = {n: _local(p, folder) for p, n in names.items()}
    tokenizer = _tokenizer_source(raw.get("tokenizer_source"), names, base)
    models = tuple(experts) if method != "linear" else tuple(names[p] for p in paths)
    try:
        recipe = MergeRecipe(method=method, base=base, models=models, params=read.params, shared=read.shared_values,
                             layout=read.layout(), normalize=normalize, label="mergekit import")
    except ValidationError as exc:
        raise _fail("models", exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    except ValueError as exc:
        raise _fail("models", str(exc)) from None
    return MergeJob(sources, recipe, dtype, tokenizer, tuple(read.warnings))


class _Settings:
    """The parameters of one mergekit config as evomerge's, read section by section."""

    def __init__(self, method: str) -> None:
        self.method, self.op = method, method_spec(method)
        self.per_expert = {p.name for p in self.op.params if p.per_expert}
        self.shared_names = {p.name for p in self.op.params if not p.per_expert}
        self.params: dict[str, dict[str, tuple[float, ...]]] = {}
        self.shared_values: dict[str, tuple[float, ...]] = {}
        self.layouts: set[str] = set()
        self.warnings: list[str] = []

    def _value(self, value: Any, where: str) -> tuple[float, ...]:
        layout, values = _setting(value, where)
        self.layouts.add(layout)
        return values

    def models(self, entries: list[Any], paths: list[str], names: dict[str, str], base_path: str | None) -> list[str]:
        """Each model entry's per-model parameters; returns the experts in order."""
        experts: list[str] = []
        for i, (entry, path) in enumerate(zip(entries, paths)):
            name = names[path]
            given = dict(entry.get("parameters") or {})
            if self.method != "linear" and path == base_path:
                if given:
                    self.warnings.append(f"models[{i}].parameters: ignored for the base model (as mergekit does)")
                continue
            if name in experts:
                raise _fail(f"models[{i}]", f"model {path} listed twice")
            experts.append(name)
            for key, value in given.items():
                if key not in self.per_expert:
                    raise _fail(f"models[{i}].parameters.{key}", f"not a per-model parameter of {self.method} "
                                f"(those are: {', '.join(sorted(self.per_expert)) or 'none'})")
                self.params.setdefault(key, {})[name] = self._value(value, f"models[{i}].parameters.{key}")
        return experts

    def shared(self, given: Mapping[str, Any], experts: list[str], normalize: bool) -> bool:
        """The top-level ``parameters``: shared ones, and defaults of per-model ones; returns
        ``normalize`` as the config sets it."""
        for key, value in given.items():
            where = f"parameters.{key}"
            if key == "normalize" and isinstance(value, bool):
                normalize = value
            elif key == "rescale" and value is True and self.op.random:
                continue  # mergekit's default for DARE/DELLA; ours is the paper's 1/p rescale
            elif key == "filter_wise" and value is False and self.method == "model_stock":
                continue
            elif key in _IGNORED:
                continue
            elif _ALIASES.get(key, key) in self.shared_names:
                self.shared_values[_ALIASES.get(key, key)] = self._value(value, where)
            elif key in self.per_expert:
                values = self._value(value, where)  # a default for every model without its own
                for name in experts:
                    self.params.setdefault(key, {}).setdefault(name, values)
            else:
                raise _fail(where, f"not supported for {self.method}")
        return normalize

    def fill_defaults(self, experts: list[str]) -> None:
        """mergekit's defaults where the config gives none; its required parameters refused missing."""
        for spec in self.op.params:
            if spec.per_expert:
                missing = [m for m in experts if m not in self.params.get(spec.name, {})]
                if missing and spec.name == "weight":
                    raise _fail(f"models ({missing[0]})", f"parameters.weight is required by mergekit's {self.method}")
                for m in missing:
                    self.params.setdefault(spec.name, {})[m] = (_mergekit_default(spec.name, spec.default),)
            elif spec.name not in self.shared_values:
                if spec.name == "t":
                    raise _fail("parameters.t", "required by slerp")
                self.shared_values[spec.name] = (_mergekit_default(spec.name, spec.default),)

    def layout(self) -> Any:
        """The one layout kind the settings use ("model" when all are constants)."""
        kinds = self.layouts - {"model"}
        if len(kinds) > 1:
            raise _fail("parameters", f"mixes {' and '.join(sorted(kinds))} settings; use one kind per config")
        return next(iter(kinds), "model")


def _local(path: str, folder: Path) -> str:
    """A relative path is looked up beside the config first, then as mergekit does (from the
    working directory, or a hub id)."""
    beside = folder / path
    return str(beside.resolve()) if not Path(path).is_absolute() and beside.exists() else path


def _mergekit_default(name: str, ours: float) -> float:
    """mergekit's default where a config omits a parameter (density 1: no pruning)."""
    return {"density": 1.0}.get(name, ours)


def _tokenizer_source(value: Any, names: dict[str, str], base: str) -> str | None:
    if value in (None, "base"):
        return None
    if value == "union":
        raise _fail("tokenizer_source", "'union' is not supported (the sources must share a vocabulary)")
    path = _model_path(value, "tokenizer_source")
    if path not in names:
        raise _fail("tokenizer_source", f"{path} is not one of the merged models")
    return names[path]


# --- export ----------------------------------------------------------------------------


def _value(values: tuple[float, ...], layout: str) -> Any:
    if len(values) == 1:
        return values[0]
    if layout == "depth":
        return list(values)
    if layout == "module":
        return [{"filter": "self_attn", "value": values[0]}, {"filter": "mlp", "value": values[1]},
                {"value": values[2]}]
    raise MergekitConfigError("layer-group genes have no mergekit equivalent (use granularity depth or module)")


def to_mergekit(recipe: Recipe, folders: Mapping[str, str], dtype: str = "float32") -> str:
    """The mergekit YAML of ``recipe`` (MergekitConfigError where mergekit cannot express it)."""
    if not isinstance(recipe, MergeRecipe):
        raise MergekitConfigError("a source model or route is not a merge: copy or replay its folder instead")
    method = recipe.method
    if method not in SHARED_METHODS:
        raise MergekitConfigError(f"mergekit has no {method} method")
    if recipe.transforms:
        raise MergekitConfigError(f"mergekit has no equivalent of the {'/'.join(recipe.transforms)} transform")
    op = method_spec(method)
    models = []
    for name in recipe.models:
        params = {p: _value(recipe.params[p][name], recipe.layout) for p in sorted(recipe.params)}
        if method in ("della", "della_linear"):
            _check_della(recipe, name)
        entry: dict[str, Any] = {"model": folders[name]}
        if params:
            entry["parameters"] = params
        models.append(entry)
    config: dict[str, Any] = {"merge_method": method}
    if method != "linear":
        config["base_model"] = folders[recipe.base]
        if method in ("slerp",):
            models.insert(0, {"model": folders[recipe.base]})
    config["models"] = models
    top: dict[str, Any] = {"normalize": recipe.normalize} if method not in ("slerp", "model_stock") else {}
    for name, values in sorted(recipe.shared.items()):
        top["lambda" if name == "scale" else name] = _value(values, recipe.layout)
    if op.random:
        top["rescale"] = True
    if top:
        config["parameters"] = top
    config["dtype"] = dtype
    head = f"# mergekit config of evomerge recipe {recipe.content_hash[:12]} ({recipe.summary()})\n"
    if op.random:
        head += f"# Note: {RANDOM_NOTE}\n"
    return head + yaml.safe_dump(config, sort_keys=False)


def _check_della(recipe: MergeRecipe, name: str) -> None:
    for d in recipe.params["density"][name]:
        for e in recipe.params["epsilon"][name]:
            if not (0 < d - e and d + e < 1):
                raise MergekitConfigError(f"mergekit refuses DELLA density {d} ± epsilon {e} outside (0, 1) "
                                          f"for model {name}")
