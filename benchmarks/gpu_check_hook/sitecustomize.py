"""benchmarks/gpu_check.sh's probe in the search's Ray workers (on PYTHONPATH for the check only).

With ``EVOMERGE_GPU_CHECK_DIGESTS=DIR`` set, every ``EvalWorker.evaluate`` in any process (the
Ray workers included: they inherit the environment) writes, after scoring, a digest of the
weights it just scored (``gpu_check.digest`` per tensor) and the process's peak GPU memory to
``DIR/<candidate id>-<pid>-<split>.json``; ``gpu_check.py replay-check`` compares a replay with
it. The patch is applied when ``evomerge.workers.actor`` is imported (an import hook), so Ray's
own Python processes never import torch for it. A ``sitecustomize`` this file shadows is run
first. Nothing changes without the variable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_shadowed = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _HERE])
if _shadowed is not None and _shadowed.loader is not None:
    _module = importlib.util.module_from_spec(_shadowed)
    _shadowed.loader.exec_module(_module)

_OUT = os.environ.get("EVOMERGE_GPU_CHECK_DIGESTS")
_TARGET = "evomerge.workers.actor"


def _patch(module: object) -> None:
    import json

    import torch

    spec = importlib.util.spec_from_file_location("_gpu_check", os.path.join(os.path.dirname(_HERE), "gpu_check.py"))
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    digest = gpu_check.digest

    worker = module.EvalWorker  # type: ignore[attr-defined]
    evaluate = worker.evaluate

    def evaluate_and_digest(self, job):  # type: ignore[no-untyped-def]
        result = evaluate(self, job)
        try:
            mat = self.materializer
            rec = {"candidate_id": job.candidate_id, "heldout": job.heldout, "pid": os.getpid(),
                   "device": str(mat.device), "placement": mat.placement,
                   "tensors": {k: digest(p) for k, p in mat.params.items()}}
            if str(mat.device).startswith("cuda"):
                rec["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            name = f"{job.candidate_id}-{os.getpid()}-{'heldout' if job.heldout else 'search'}.json"
            tmp = os.path.join(_OUT, f".{name}.tmp")
            with open(tmp, "w") as f:
                json.dump(rec, f)
            os.replace(tmp, os.path.join(_OUT, name))
        except Exception as exc:  # the probe never fails a trial
            print(f"gpu_check_hook: no digest for candidate {job.candidate_id}: {exc}", file=sys.stderr)
        return result

    worker.evaluate = evaluate_and_digest


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            run(module)
            _patch(module)
        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _OUT and _TARGET not in sys.modules:
    os.makedirs(_OUT, exist_ok=True)
    sys.meta_path.insert(0, _Finder())
