"""Named presets and the defaults that depend on other fields, applied to a config as read.

A preset fills in fields the config leaves out (what the config gives wins). ``sakana`` is
the setting of Akiba et al. (2024, §4.1): TIES-DARE with a density and a weight per source
model in [0, 1], CMA-ES with every gene starting at 0.5 and σ0 = 1/6, no restarts, no
prior from the baselines.

Without a preset, weights are searched in [0, 2] rather than the operator's declared
[0, 1]: merges that combine experts often *amplify* task vectors (Sakana's evolved
weights summed to nearly 2), and a box that stops at 1 pins the search to its wall or,
started at 0.5 each, to averaging (docs/search.md has the measurements). Applied only
when the config gives no range for ``weight``, so stored configs (which carry their
ranges) are never changed.
"""

from __future__ import annotations

import copy
from typing import Any

from evomerge.search.families import AUTO, FAMILIES
from evomerge.workers.methods import METHODS

AMPLIFY = (0.0, 2.0)  # default search range of per-expert weights

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sakana": {
        "merge": {"method": "dare_ties", "granularity": "model", "ranges": {}},
        "optimizer": {"name": "cma", "init": 0.5, "sigma0": 1 / 6, "start": "init", "restarts": 0},
    },
}


def apply_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a config mapping as read) with its preset and field-dependent defaults filled in.
    Unknown presets and malformed sections are left for validation to report."""
    out = copy.deepcopy(raw)
    preset = PRESETS.get(out.get("preset")) if isinstance(out.get("preset"), str) else None
    for section, values in (preset or {}).items():
        if isinstance(out.setdefault(section, {}), dict):
            for key, value in values.items():
                out[section].setdefault(key, copy.deepcopy(value))
    merge = out.setdefault("merge", {})
    if isinstance(merge, dict) and "ranges" not in merge:
        method = merge.get("method", AUTO)
        ops = [METHODS[m] for m in (FAMILIES if method == AUTO else (method,)) if m in METHODS]
        fixed = merge.get("fixed") if isinstance(merge.get("fixed"), dict) else {}
        if any(p.name == "weight" and p.per_expert and p.searched and p.high <= 1.0
               for op in ops for p in op.params) and "weight" not in fixed:
            merge["ranges"] = {"weight": list(AMPLIFY)}
    return out
