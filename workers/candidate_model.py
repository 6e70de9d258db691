"""The worker's one model, made into any candidate: a source, a merge, or a layer route.

Sources and merges are materialized in place (:class:`workers.materialize.Materializer`).
A route is built by a :class:`workers.routing.Router` on the same model object: its
non-layer weights are set to the route's head model (a source, or a merge such as the PS
model in PS+DFS) once, then each route only swaps the layer list. Layer stacks of the
other collection models share the loaded source tensors; a collection model that is a
merge is materialized once per worker.

Every collection model has the working model's own config (the sources of one worker have
one architecture, checked when they are loaded). A route never rewrites that object: the
router gives the model a config of its own per route and puts the own one back on release.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel

from evomerge.workers.materialize import Materializer
from evomerge.workers.recipe import complete
from evomerge.workers.recipe import Recipe
from evomerge.workers.routing import Route, Router, build_stack


class CandidateModel:
    """``apply(recipe)`` makes ``model`` the recipe's model."""

    def __init__(self, materializer: Materializer) -> None:
        self.materializer = materializer
        self.model: PreTrainedModel = materializer.model
        self.config: PretrainedConfig = materializer.model.config  # the model's own, never a route's
        self._routers: dict[str, Router] = {}
        self._router: Router | None = None  # the one whose route is in the model now
        self._weights: str | None = None  # content hash of what the model's own weights hold
        self._members: dict[str, dict[str, torch.Tensor]] = {}  # merged members' tensors, by recipe hash

    def apply(self, recipe: Recipe) -> None:
        if recipe.kind != "route":
            self.release()
            self.materializer.apply(recipe)
            self._weights = recipe.content_hash
            return
        head = recipe.members.get(recipe.base or "") or Recipe(kind="source", source=recipe.base)
        router = self._router_for(recipe)
        if self._weights != head.content_hash:
            self.release()
            self.materializer.apply(head)
            self._weights = head.content_hash
        router.apply(Route(recipe.base or "", recipe.route, recipe.scales))
        self._router = router

    def release(self) -> None:
        """Give the model back its own layers (after a route)."""
        if self._router is not None:
            self._router.restore()
            self._router = None

    def _router_for(self, recipe: Recipe) -> Router:
        key = Recipe(kind="route", base=recipe.base, models=recipe.models, members=recipe.members).content_hash
        if key not in self._routers:
            self.release()
            mat = self.materializer
            template = mat.model.model.layers[0]
            stacks = {}
            for name in recipe.models:
                if name == recipe.base:
                    stacks[name] = list(mat.model.model.layers)  # the model's own layers hold the head
                else:
                    stacks[name] = build_stack(template, self.config, self.tensors_of(recipe, name))
            configs = {name: self.config for name in recipe.models}
            self._routers[key] = Router(mat.model, stacks, configs, recipe.base or "")
        return self._routers[key]

    def tensors_of(self, recipe: Recipe, name: str) -> dict[str, torch.Tensor]:
        """The state dict of collection model ``name`` of a route recipe (shared, not copied,
        for sources)."""
        if name in recipe.members:
            return self._merged(recipe.members[name])
        return self.materializer.source_tensors(name)

    @torch.no_grad()
    def _merged(self, member: Recipe) -> dict[str, torch.Tensor]:
        """A merged collection model's tensors (computed once per worker; routes share them)."""
        full = complete(member)
        if full.kind == "source":
            return self.materializer.source_tensors(full.source or "")
        if full.content_hash not in self._members:
            self._members[full.content_hash] = {key: self.materializer.merge_tensor(full, key)
                                                for key in self.materializer.params}
        return self._members[full.content_hash]
