"""Data-flow-space (DFS) models: a path of decoder layers drawn from several source models.

Akiba et al. (2024, §3.2) evolve which layer of which model runs next. A route is a list of
hops (model, layer) with one scale per hop; model A (the route's ``head`` model) gives the
embeddings, final norm, head, rotary embedding and tokenizer.

Scale semantics (Sakana's released runtime, ../shared/DESIGN.md §3): the scale of hop k
multiplies what hop k−1 adds to the residual stream through its MLP, and the scale of hop
0 the embeddings. (Scaling a layer's whole input would do nothing useful: RMSNorm is scale
invariant, so it would only reweight the carried residual.) Two consequences:

- in memory (:class:`Router`), a candidate is a new layer list of per-hop shallow copies
  of the source layers, sharing their weights; each hop gets its own KV-cache slot
  (attention ``layer_idx`` = hop) and scales are applied at run time;
- on export (:func:`export_state_dict`), the same model is an ordinary model of A's
  architecture with one decoder layer per hop, where hop k's MLP output projection is
  multiplied by the scale of hop k+1 and the embedding by the scale of hop 0 (untied
  from the head when they were tied).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from evomerge.workers.layout import layer_index
from evomerge.workers.route_spec import Route, RouteError, check_routable

MLP_OUT = ".mlp.down_proj."  # the projection whose output hop k+1's scale multiplies (Llama family)


class _Scaled(nn.Module):
    """A module whose output is multiplied by a constant (a hop scale), sharing the module."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        return self.inner(*args, **kwargs) * self.scale


def _shallow(module: nn.Module) -> nn.Module:
    """A copy sharing parameters and submodules but with its own registries: assigning a
    submodule on the copy must not change the source (copy.copy alone shares the dicts)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def hop_layer(layer: nn.Module, hop: int, mlp_scale: float) -> nn.Module:
    """Source ``layer`` as hop ``hop``: its own attention object with KV-cache slot ``hop``, and
    its MLP output scaled by ``mlp_scale`` (the next hop's scale). Weights are shared."""
    clone = _shallow(layer)
    attention = _shallow(layer.self_attn)
    attention.layer_idx = hop
    clone._modules["self_attn"] = attention
    if mlp_scale != 1.0:
        clone._modules["mlp"] = _Scaled(layer.mlp, mlp_scale)
    return clone


class Router:
    """Turns ``shell`` into route models, one candidate after another.

    ``shell`` is a causal LM whose non-layer weights (embeddings, final norm, head) are the
    head model's; it stays the same object (an evaluator may hold it): :meth:`apply` swaps
    its layer list, embedding wrapper and depth in place, :meth:`restore` puts its own back.
    ``stacks[name]`` are the decoder layers of each collection model (shared, never copied).
    """

    def __init__(self, shell: PreTrainedModel, stacks: Mapping[str, Sequence[nn.Module]],
                 configs: Mapping[str, PretrainedConfig], head: str) -> None:
        check_routable(configs, head)
        self.model = shell
        self.head = head
        self._stacks = {n: list(s) for n, s in stacks.items()}
        self._configs = dict(configs)
        inner = shell.model
        self._own = (inner._modules["layers"], inner._modules["embed_tokens"], shell.config)

    @classmethod
    def over_models(cls, sources: Mapping[str, PreTrainedModel], head: str) -> "Router":
        """A router on a shallow copy of ``sources[head]`` (the sources stay untouched)."""
        a = sources[head]
        shell: PreTrainedModel = _shallow(a)  # type: ignore[assignment]
        shell.config = copy.deepcopy(a.config)
        inner = _shallow(a.model)
        inner.config = shell.config
        shell._modules["model"] = inner
        return cls(shell, {n: list(m.model.layers) for n, m in sources.items()},
                   {n: m.config for n, m in sources.items()}, head)

    def apply(self, route: Route) -> None:
        """Make ``model`` the route's model."""
        if route.head != self.head:
            raise RouteError(f"route's head model {route.head!r} is not this router's {self.head!r}")
        layers = []
        for k, (name, index) in enumerate(route.hops):
            if name not in self._stacks or not 0 <= index < len(self._stacks[name]):
                raise RouteError(f"hop {k}: no layer {index} in model {name!r}")
            next_scale = route.scales[k + 1] if k + 1 < len(route.hops) else 1.0
            layers.append(hop_layer(self._stacks[name][index], k, next_scale))
        inner = self.model.model
        inner._modules["layers"] = nn.ModuleList(layers)
        embed = self._own[1]
        inner._modules["embed_tokens"] = embed if route.scales[0] == 1.0 else _Scaled(embed, route.scales[0])
        # The route's own config object: the shell's config may be shared (the collection's
        # configs, layers built from it), so it is swapped, never rewritten.
        self.model.config = inner.config = route_config(self._own[2], route, self._configs)

    def restore(self) -> None:
        """Give the shell back its own layers, embedding and config."""
        inner = self.model.model
        inner._modules["layers"], inner._modules["embed_tokens"] = self._own[0], self._own[1]
        self.model.config = inner.config = self._own[2]


def build_stack(template: nn.Module, config: PretrainedConfig, tensors: Mapping[str, Tensor]) -> list[nn.Module]:
    """Decoder layers of one model built around ``tensors`` (its state dict) without copying them:
    each layer is a ``type(template)(config, i)`` whose parameters are then *assigned* the
    tensors, so the stack shares their storage."""
    layers = []
    count = 1 + max((i for i in map(layer_index, tensors) if i is not None), default=-1)
    for i in range(count):
        prefix = f"model.layers.{i}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        with torch.device("meta"):
            layer = type(template)(config, i)  # type: ignore[call-arg]
        layer.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*layer.parameters(), *layer.buffers())):
            raise RouteError(f"cannot build layer {i} of {type(template).__name__} from tensors (state beyond weights)")
        layers.append(layer.eval())
    return layers


def route_config(config: PretrainedConfig, route: Route, sources: Mapping[str, PretrainedConfig]) -> PretrainedConfig:
    """A new copy of ``config`` with one layer per hop: ``num_hidden_layers`` = hops and, where
    the config has ``layer_types`` (Qwen2 and newer), hop k's type = its source layer's type.
    Neither ``config`` nor ``sources`` is changed."""
    out = copy.deepcopy(config)
    out.num_hidden_layers = len(route.hops)
    if getattr(config, "layer_types", None) is not None:
        types = []
        for k, (name, index) in enumerate(route.hops):
            own = getattr(sources[name], "layer_types", None)
            if own is None or not 0 <= index < len(own):
                raise RouteError(f"hop {k}: model {name!r}'s config has no layer_types entry for layer {index}")
            types.append(own[index])
        out.layer_types = types
    return out


def export_state_dict(route: Route, tensors: Mapping[str, Mapping[str, Tensor]], tied: bool) -> dict[str, Tensor]:
    """The route as the state dict of an ordinary model of the head model's architecture:
    layer k holds hop k's weights, its MLP output projection scaled by hop k+1's scale, the
    embedding by hop 0's. ``tied``: the head model ties embedding and head (its tensors hold
    no ``lm_head.weight``); the export carries the unscaled embedding as ``lm_head.weight``,
    which a strict load of a tied model needs too, and is untied when hop 0's scale is not 1."""
    head = tensors[route.head]
    out: dict[str, Tensor] = {k: v for k, v in head.items() if layer_index(k) is None}
    embed_key = next(k for k in head if k.endswith("embed_tokens.weight"))
    if tied:
        out["lm_head.weight"] = head[embed_key]
    if route.scales[0] != 1.0:
        out[embed_key] = head[embed_key] * route.scales[0]
    for k, (name, index) in enumerate(route.hops):
        scale = route.scales[k + 1] if k + 1 < len(route.hops) else 1.0
        prefix = f".layers.{index}."
        found = False
        for key, value in tensors[name].items():
            if prefix not in key or layer_index(key) != index:
                continue
            found = True
            new_key = key.replace(prefix, f".layers.{k}.", 1)
            out[new_key] = value * scale if MLP_OUT in key and scale != 1.0 else value
        if not found:
            raise RouteError(f"hop {k}: model {name!r} has no tensors of layer {index}")
    if not any(MLP_OUT in key for key in out):
        raise RouteError(f"cannot fold hop scales: no {MLP_OUT.strip('.')} tensors (only Llama-family MLPs)")
    return out


def export_config(route: Route, configs: Mapping[str, PretrainedConfig]) -> PretrainedConfig:
    """The head model's config with one layer per hop (and untied embeddings when scaled)."""
    config = route_config(configs[route.head], route, configs)
    if getattr(config, "tie_word_embeddings", False) and route.scales[0] != 1.0:
        config.tie_word_embeddings = False
    return config
