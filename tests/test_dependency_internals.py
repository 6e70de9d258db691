"""What evomerge takes from its dependencies' non-public API, each isolated in one adapter
module (docs/architecture.md lists them). A release that renames or drops one fails here,
by name, instead of silently changing behaviour."""

from __future__ import annotations

import torch

from evomerge.workers.torch_internals import recompile_limit


def test_torch_keeps_its_recompile_limit_setting() -> None:
    before = torch._dynamo.config.recompile_limit
    with recompile_limit(before + 5):
        assert torch._dynamo.config.recompile_limit == before + 5
    assert torch._dynamo.config.recompile_limit == before
