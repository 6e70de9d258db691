"""A source model as a config names it, and the error a source that cannot be used raises.

No torch or transformers here: the config is loaded and validated without a tensor
library (evomerge.workers.sources reads the folders on the worker side).
"""

from __future__ import annotations

from dataclasses import dataclass


class SourceError(ValueError):
    """A source model cannot be used; the message is one line."""


@dataclass(frozen=True)
class SourceModel:
    """A named source model: a local folder, or a hub id resolved through the HF cache."""

    name: str
    path: str
