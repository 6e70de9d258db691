"""docker/compose.yaml validates with docker-compose, and means what docs/cluster.md says.

No container engine here: `docker-compose config` (Debian's package) parses, interpolates
and validates the file; the checks below read its normalised output.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, system_tool

COMPOSE = ROOT / "docker" / "compose.yaml"
RAY_NODES = ("ray-head", "ray-worker-0", "ray-worker-1", "controller")


def _config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    tool = system_tool("docker-compose")
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([tool, "-f", str(COMPOSE), "--profile", "setup", "config"], cwd=tmp_path,
                          env={**base, **env}, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("compose")
    proc = _config(tmp, POSTGRES_PASSWORD="pw", RAY_AUTH_TOKEN="tok", EVOMERGE_WORKDIR="/srv/work")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)["services"]


def test_every_evomerge_service_runs_one_pinned_image(services: dict[str, dict]) -> None:
    ours = {name: s for name, s in services.items() if name != "db"}
    assert {s["image"] for s in ours.values()} == {"evomerge:0.1.0"}
    assert services["db"]["image"].count(".") >= 1  # postgres:16.x, not a moving major tag
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile  # Ray and the rest at the tested versions


def test_each_gpu_worker_has_its_own_gpu(services: dict[str, dict]) -> None:
    ids = []
    for name in ("ray-worker-0", "ray-worker-1"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device  # "count: all" gave every container every GPU
        ids.extend(device["device_ids"])
    assert sorted(ids) == ["0", "1"]


def test_models_and_tasks_are_at_the_same_paths_on_every_ray_node(services: dict[str, dict]) -> None:
    for name in RAY_NODES:
        assert {"models:/models:ro", "/srv/work:/work:ro"} <= set(services[name]["volumes"]), name
    assert services["models"]["volumes"] == ["models:/models:rw"]  # the one-shot step fills it


def test_controller_is_a_ray_node_and_every_node_uses_token_auth(services: dict[str, dict]) -> None:
    command = " ".join(services["controller"]["entrypoint"])
    assert "ray start --address=ray-head:6379" in command and "evomerge search /work/config.yaml" in command
    assert command.index("ray start") < command.index("evomerge search")
    for name in RAY_NODES:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == "tok", name
    assert "PGPASSWORD" not in services["ray-worker-0"]["environment"]  # workers never see the database


def test_dashboard_is_published_on_loopback_only(services: dict[str, dict]) -> None:
    (port,) = services["dashboard"]["ports"]
    published = port if isinstance(port, str) else f"{port.get('host_ip')}:{port['published']}"
    assert published.startswith("127.0.0.1:")


def test_missing_secrets_are_refused_by_name(tmp_path: Path) -> None:
    proc = _config(tmp_path, POSTGRES_PASSWORD="pw", EVOMERGE_WORKDIR="/srv/work")
    assert proc.returncode != 0 and "RAY_AUTH_TOKEN" in proc.stderr
