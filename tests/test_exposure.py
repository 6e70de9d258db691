"""What a local search exposes: Ray's sockets on loopback only, no database secrets in workers."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil
import pytest

from evomerge.search.config import load_config
from evomerge.workers.pool import WorkerPool
from tests.helpers import write_config
from evomerge.workers.worker_spec import WorkerSpec


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or addr).is_loopback


def _environ(pid: int) -> dict[str, str]:
    """The environment a process started with (what its children inherit)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def test_local_ray_listens_on_loopback_only_and_workers_lack_db_secrets(
        tmp_path: Path, tiny_models: dict[str, Path], tiny_tasks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()  # a Ray left by another test was not started by the pool
    monkeypatch.setenv("PGPASSWORD", "not-for-workers")
    monkeypatch.setenv("EVOMERGE_STORAGE", "postgresql://u:not-for-workers@db/evomerge")
    cfg = load_config(write_config(tmp_path / "c.yaml", {k: tiny_models[k] for k in ("base", "a")}, tiny_tasks))
    from evomerge.search.app.commands import prepare

    prep = prepare(cfg)
    pool = WorkerPool(WorkerSpec(prep.folders, cfg.base_model, cfg.suite()), 2, 1, 0)
    try:
        names = pool.wait_ready()
        assert os.environ["PGPASSWORD"] == "not-for-workers"  # the controller keeps its own
        me = psutil.Process()
        ray_pids = {me.pid, *(p.pid for p in me.children(recursive=True))}
        workers = {int(n.rpartition(":")[2]) for n in names}
        assert workers <= ray_pids
        listening = [c for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in ray_pids]
        names_of = {pid: psutil.Process(pid).name() for pid in {c.pid for c in listening}}
        assert {"gcs_server", "raylet"} <= set(names_of.values()), names_of  # the check saw Ray itself
        exposed = [(names_of[c.pid], c.laddr.ip, c.laddr.port) for c in listening if not _loopback(c.laddr.ip)]
        assert not exposed, f"Ray sockets reachable from the network: {exposed}"
        for pid in ray_pids - {me.pid}:
            try:
                env = _environ(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # a short-lived helper that already exited
            leaked = {"PGPASSWORD", "EVOMERGE_STORAGE"} & set(env)
            assert not leaked, f"{psutil.Process(pid).name()} ({pid}) has {leaked}"
        assert all("PGPASSWORD" not in _environ(pid) for pid in workers)
    finally:
        pool.shutdown()
        ray.shutdown()
