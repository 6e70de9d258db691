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
from evomerge.workers.recipe import Recipe, RouteRecipe, SourceRecipe
from evomerge.workers.route_spec import Route
from evomerge.workers.routing import Router, build_stack


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
        if not isinstance(recipe, RouteRecipe):
            self.release()
            self.materializer.apply(recipe)
            self._weights = recipe.content_hash
            return
        head = recipe.head()
        router = self._router_for(recipe)
        if self._weights != head.content_hash:
            self.release()
            self.materializer.apply(head)
            self._weights = head.content_hash
        router.apply(Route(recipe.base, recipe.route, recipe.scales))
        self._router = router

    def release(self) -> None:
        """Give the model back its own layers (after a route)."""
        if self._router is not None:
            self._router.restore()
            self._router = None

    def _router_for(self, recipe: RouteRecipe) -> Router:
        key = recipe.collection().content_hash
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
            self._routers[key] = Router(mat.model, stacks, configs, recipe.base)
        return self._routers[key]

    def tensors_of(self, recipe: RouteRecipe, name: str) -> dict[str, torch.Tensor]:
        """The state dict of collection model ``name`` of a route recipe (shared, not copied,
        for sources)."""
        if name in recipe.members:
            return self._merged(recipe.members[name])
        return self.materializer.source_tensors(name)

    @torch.no_grad()
    def _merged(self, member: Recipe) -> dict[str, torch.Tensor]:
        """A merged collection model's tensors (computed once per worker; routes share them)."""
        if isinstance(member, SourceRecipe):
            return self.materializer.source_tensors(member.source)
        if member.content_hash not in self._members:
            self._members[member.content_hash] = {key: self.materializer.merge_tensor(member, key)
                                                  for key in self.materializer.params}
        return self._members[member.content_hash]
