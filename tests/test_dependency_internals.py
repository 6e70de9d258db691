"""What evomerge takes from its dependencies' non-public API, each isolated in one adapter
module (docs/architecture.md lists them). A release that renames or drops one fails here,
by name, instead of silently changing behaviour."""

from __future__ import annotations

import torch

from evomerge.workers.kernels.torch_internals import recompile_limit


def test_torch_keeps_its_recompile_limit_setting() -> None:
    before = torch._dynamo.config.recompile_limit
    with recompile_limit(before + 5):
        assert torch._dynamo.config.recompile_limit == before + 5
    assert torch._dynamo.config.recompile_limit == before


def test_lm_eval_keeps_the_members_its_adapter_uses() -> None:
    import inspect

    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    assert list(inspect.signature(HFLM._encode_pair).parameters) == ["self", "context", "continuation"]
    assert "self.batch_size_per_gpu" in inspect.getsource(HFLM.__init__)  # read per call by HFLM's batching
    assert "self._instances" in inspect.getsource(ConfigurableTask.build_all_requests)


def test_ray_keeps_the_switches_that_hold_it_on_loopback() -> None:
    import inspect

    import ray
    from ray._private import ray_constants

    assert hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in inspect.getsource(ray_constants)
    assert "_node_ip_address" in inspect.getsource(inspect.unwrap(ray.init))  # taken through **kwargs
    # the agent's port ($EVOMERGE_RAY_AGENT_PORT): ray.init builds RayParams through the module
    from ray._private import parameter

    assert "ray._private.parameter.RayParams(" in inspect.getsource(inspect.unwrap(ray.init))
    assert "dashboard_agent_listen_port" in inspect.signature(parameter.RayParams).parameters


def test_optuna_dashboard_keeps_its_note_format() -> None:
    from optuna_dashboard import _note

    from evomerge.search.app.dashboard_notes import NOTE_CHUNK, note_keys

    assert note_keys(7) == (_note.note_ver_key(7), _note.note_str_key_prefix(7))
    assert NOTE_CHUNK == _note.SYSTEM_ATTR_MAX_LENGTH
