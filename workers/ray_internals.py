"""The one place evomerge reaches into Ray's non-public API and the process environment.

A private Ray on one machine must keep every socket on loopback. Ray replaces a loopback
node address by the host's own (and its agents, metrics and gRPC servers then listen on every
interface) unless its "cluster" mode is off, a switch (``ray._private.ray_constants.
ENABLE_RAY_CLUSTER``) it reads from the environment once, when first imported; a host program
may have imported it before us, so the constant is set too. ``ray.init``'s
``_node_ip_address`` pins the node to loopback. Ray's processes inherit the environment they
start in, and Ray has no way to withhold a variable from them: the controller's own secrets
are taken out of ``os.environ`` while Ray starts and put back after.
Ray's dashboard agent serves HTTP on one fixed port (52365) that ``ray.init`` cannot change: a
second Ray on the machine retries it for ~3 s, then runs without it. $EVOMERGE_RAY_AGENT_PORT
names another (0: any free one; the test suite, whose Rays run side by side, sets it) and is
given to the ``RayParams`` that ``ray.init`` builds; unset, Ray's default stands.
tests/test_dependency_internals.py fails by name when a Ray release changes any of these.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


AGENT_PORT_ENV = "EVOMERGE_RAY_AGENT_PORT"


def start_on_loopback(num_cpus: int, num_gpus: float, withhold: Callable[[str], bool]) -> Any:
    """A private Ray on 127.0.0.1 (``ray`` itself), its processes started without the
    environment variables ``withhold`` names."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by Ray's first import
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    if not ray.is_initialized():
        with _environ_without(withhold), _agent_port(os.environ.get(AGENT_PORT_ENV)):
            # address="local": a private Ray, never a cluster that `ray start` (or RAY_ADDRESS) left
            ray.init(address="local", num_cpus=num_cpus, num_gpus=None if num_gpus else 0, include_dashboard=False,
                     _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)
    return ray


@contextmanager
def _environ_without(drop: Callable[[str], bool]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if drop(k)}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _agent_port(port: str | None) -> Iterator[None]:
    """While it lasts, the ``RayParams`` that ``ray.init`` builds give the dashboard agent's HTTP
    server ``port`` (``ray.init`` has no argument for it); nothing changes when ``port`` is None."""
    if port is None:
        yield
        return
    from ray._private import parameter

    original = parameter.RayParams
    listen_port = int(port)

    class _WithAgentPort(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", listen_port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _WithAgentPort
    try:
        yield
    finally:
        parameter.RayParams = original
