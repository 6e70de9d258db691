"""The one place evomerge reaches into torch's non-public API.

torch.compile has no public setting for how many specialisations of one function it keeps
(dynamo's ``recompile_limit``, default 8). The fused merge kernels need more: one variant
per expert count, election, band shape and thread count. Past the limit a ``fullgraph``
compile fails and every merge would fall back to the eager path. tests/test_dependency_internals.py
fails loudly when a torch release renames or drops the setting.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def recompile_limit(limit: int) -> AbstractContextManager[None]:
    """A context in which torch.compile keeps up to ``limit`` variants of a compiled function."""
    return torch._dynamo.config.patch(recompile_limit=limit)
