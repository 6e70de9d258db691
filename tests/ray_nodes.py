"""Real Ray nodes for the suite, started the way docs/cluster.md says (``ray start --head``, then
``ray start --address`` on another node) with token authentication, each on a loopback address
of its own: Ray replaces 127.0.0.1 by the host's address in its cluster mode and keeps the rest
of 127/8, so nodes on 127.0.0.2 and 127.0.0.3 reach each other and nothing else.

Two uses: tests/test_multinode.py's two-node cluster (a :class:`Node` per ``ray start --block``,
killed to lose a machine), and the suite's shared head (:class:`Head`): the search subprocesses
of a pytest process join it with ``--ray-address`` (through ``$EVOMERGE_RAY_ADDRESS``) instead of
each starting and stopping a Ray of its own, ~4 s of a ~16 s search process.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from evomerge.workers.pool import controller_only

RAY = str(Path(sys.executable).with_name("ray"))
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout: float = 240.0, every: float = 0.5) -> T:
    """``check()``'s first truthy value, polled every ``every`` seconds; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def node_env(token: Path | None) -> dict[str, str]:
    """The environment of a node and of the drivers joining it: token authentication (``token``'s,
    or the default token file's when None), Ray's cluster mode on (an in-process local Ray of the
    suite may have switched it off in ``os.environ``), and none of the controller's database
    secrets (workers never see them, as with a local Ray)."""
    env = {k: v for k, v in os.environ.items() if not (controller_only(k) or k == "EVOMERGE_TEST_POSTGRES_URL")}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return {**env, "RAY_AUTH_MODE": "token", **({"RAY_AUTH_TOKEN_PATH": str(token)} if token else {})}


def new_token(folder: Path) -> Path:
    token = folder / "ray_token"
    token.write_text(secrets.token_hex(32))
    return token


def default_token() -> None:
    """Ray's default token file (~/.ray/auth_token), created once if missing, under a lock: every
    Ray of the suite but test_multinode's uses it, and Ray reads a process's token once, so a
    second token in one process would lock its later Rays out."""
    with open(os.path.join(tempfile.gettempdir(), "evomerge-ray-token.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)


def ray_temp_dir() -> Path:
    """A node's own temp dir (short: Ray's socket paths must fit 107 bytes), so ``ray start --head``
    does not leave its address in /tmp/ray for later drivers."""
    return Path(tempfile.mkdtemp(prefix="evray", dir="/tmp"))


class Node:
    """One ``ray start --block`` in its own session: its process group is the whole node."""

    def __init__(self, args: list[str], env: Mapping[str, str], log: Path, num_cpus: int = 1) -> None:
        self.log = log
        self.proc = subprocess.Popen([RAY, "start", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
                                      "--disable-usage-stats", *args],
                                     env=dict(env), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def owns(self, pid: int) -> bool:
        try:
            return os.getsid(pid) == self.proc.pid
        except ProcessLookupError:
            return False

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@dataclass(frozen=True)
class Head:
    """A detached one-node Ray cluster on 127.0.0.2: ``ray start --head`` (without ``--block``) in a
    session of its own, so its processes are no descendants of the test process (whose Ray
    processes tests/test_exposure.py inspects); stopped by signalling that session's group."""

    address: str
    group: int
    temp: Path

    @classmethod
    def start(cls, folder: Path, num_cpus: int) -> Head:
        """Started with Ray's default token (:func:`default_token`), the one every local Ray of
        the suite uses: a driver joins with the address and ``RAY_AUTH_MODE=token``."""
        temp = ray_temp_dir()
        port = free_port("127.0.0.2")
        log = folder / "head.log"
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--node-ip-address=127.0.0.2", f"--port={port}", f"--num-cpus={num_cpus}",
             "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
             f"--dashboard-agent-listen-port={free_port('127.0.0.2')}"],
            env=node_env(None), stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
        head = cls(f"127.0.0.2:{port}", proc.pid, temp)
        if proc.wait(timeout=300) != 0:  # `ray start` returns once the head is up
            head.stop()
            raise RuntimeError(f"ray start --head failed: {log.read_text()[-2000:]}")
        return head

    def stop(self) -> None:
        """SIGKILL to the head's processes (a throwaway cluster: Ray's own stop takes seconds)."""
        try:
            os.killpg(self.group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _gone(self.group, 30.0)
        shutil.rmtree(self.temp, ignore_errors=True)


def _gone(group: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False
