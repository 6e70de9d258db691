"""Shared fixtures: tiny real models built on the fly, the shipped demo assets, torch's thread
count. The helpers they are built from (and that tests import) are in tests/helpers.py."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Each test's Ray (and each search subprocess's) takes any free port for its dashboard agent:
# on Ray's one fixed port, every Ray started beside another waited ~3 s (workers/ray_internals.py).
os.environ.setdefault("EVOMERGE_RAY_AGENT_PORT", "0")
# Every Ray of the session (in-process, a search subprocess's own, the shared head a subprocess
# joins) with token authentication on Ray's default token file: Ray reads a process's auth mode
# and token once, so they must not change while a session runs (see tests/ray_nodes.py).
os.environ.setdefault("RAY_AUTH_MODE", "token")

from tests.helpers import ARCHITECTURES, save_tiny_arch, save_tiny_model  # noqa: E402  (after the offline env)
from tests.ray_nodes import Head, default_token  # noqa: E402

@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "base": save_tiny_model(root / "base"),
        "a": save_tiny_model(root / "a", seed=1, noise=0.05),
        "b": save_tiny_model(root / "b", seed=2, noise=0.05),
        "wide": save_tiny_model(root / "wide", hidden=48),
    }


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval YAML tasks over small local JSONL files, with search and held-out splits."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    (root / "data").mkdir()
    for name, op in (("tiny_add", "+"), ("tiny_sub", "-")):
        for split in ("search", "heldout"):
            with open(root / "data" / f"{name}_{split}.jsonl", "w") as f:
                for _ in range(12):
                    a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
                    f.write(json.dumps({"question": f"{a}{op}{b}=", "answer": str(a + b if op == "+" else a - b)}) + "\n")
        (root / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    search: data/{name}_search.jsonl\n    heldout: data/{name}_heldout.jsonl\n"
            "test_split: search\noutput_type: loglikelihood\ndoc_to_text: \"{{question}}\"\n"
            "doc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\nmetric_list:\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return root


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """architecture -> {"base", "a", "b"}: a random tiny base and two noisy experts of it."""
    root = tmp_path_factory.mktemp("arch")
    return {arch: {"base": save_tiny_arch(root / arch / "base", arch),
                   "a": save_tiny_arch(root / arch / "a", arch, seed=1, noise=0.05),
                   "b": save_tiny_arch(root / arch / "b", arch, seed=2, noise=0.05)}
            for arch in ARCHITECTURES}


# Modules whose tests share one outside resource, run in turn on one pytest-xdist worker
# (`make test` runs two): test_outage stops and restarts the one PostgreSQL server under the feet
# of every other test that uses it.
_SERIAL_GROUPS = {"test_outage": "postgres", "test_postgres": "postgres", "test_lease": "postgres",
                  "test_schema_upgrade": "postgres"}
# Module-scoped fixtures that run a search or a build (tens of seconds): the tests that use one
# run on one worker, else each worker builds it again. A parametrized one is a group per value.
_BUILT_ONCE = ("searched", "ps_dfs", "front_study", "tracked", "services", "native_bits", "big", "adapter_models")


def _group(item: pytest.Item) -> str | None:
    module = getattr(item, "module", None)
    if module is None:
        return None
    name = module.__name__.rsplit(".", 1)[-1]
    if name in _SERIAL_GROUPS:
        return _SERIAL_GROUPS[name]
    used = [f for f in _BUILT_ONCE if f in getattr(item, "fixturenames", ())]
    if not used:
        return None
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    return f"{name}:" + ",".join(f"{f}={params[f]}" if f in params else f for f in used)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # pytest-xdist's --dist loadgroup keeps each group on one worker (it needs pytest < 9.2:
    # pytest-dev/pytest-xdist#1386; pinned in pyproject.toml)
    for item in items:
        group = _group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """The Ray a test's in-process pool starts (tests/test_failures.py's controllers, run_search) is
    kept for the session's later tests, in every module: each start costs seconds. Shut down at
    the end of the session; a test that needs a Ray of its own shuts this one down first."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def cli_fork_server() -> Iterator[None]:
    """The fork server of this pytest process's ``evomerge`` commands (tests/cli_fork.py), started
    by the first command, stopped at the session's end."""
    from tests import cli_fork

    yield
    cli_fork.stop()


@pytest.fixture(scope="session", autouse=True)
def ray_token() -> None:
    """Ray's default token file exists before any Ray of the session starts (created once)."""
    default_token()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """One real Ray cluster per pytest process (each pytest-xdist worker has its own), started on
    first use and stopped at the session's end. 4 logical CPUs: twice what a test's search asks
    for (2 workers), so a search never waits for the actors of a killed one to be released; Ray
    keeps one idle Python process started per logical CPU, which the next actors take."""
    head = Head.start(tmp_path_factory.mktemp("ray_head"), num_cpus=4)
    yield head
    head.stop()


@pytest.fixture(scope="module")
def joined_ray(ray_head: Head) -> Iterator[str]:
    """For a module's tests (``pytestmark = pytest.mark.usefixtures("joined_ray")``): the ``evomerge``
    subprocesses they start join the shared cluster (``$EVOMERGE_RAY_ADDRESS``, the default of
    ``--ray-address``) instead of each starting and stopping a local Ray, ~4 s of a ~16 s process.
    A local Ray stays covered: the in-process pools, test_exposure, test_plan, test_multinode."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOMERGE_RAY_ADDRESS", ray_head.address)
        yield ray_head.address


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's intra-op threads (which the native kernels follow) set to 1, then 2; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
