"""The shipped configs validate, and what defines a study is separated from run settings."""

from __future__ import annotations

from tests.helpers import ROOT
from evomerge.search.config import load_config


def test_shipped_configs_validate() -> None:
    ref = load_config(ROOT / "examples" / "reference.yaml")
    assert ref.merge.method == "auto" and ref.experts == ("math", "code")
    assert ref.models[0].path == "meta-llama/Llama-3.1-8B"  # a hub id stays a hub id
    assert ref.models[1].path == str((ROOT / "examples" / "models" / "llama-math").resolve())
    demo = load_config(ROOT / "examples" / "demo.yaml")  # a link to demo/demo.yaml
    assert demo.models[0].path == str(ROOT / "demo" / "models" / "base")
    assert [t.name for t in demo.evaluation.tasks] == ["cipher_a", "cipher_b", "cipher_mix"]


def test_identity_ignores_budget_and_workers() -> None:
    demo = load_config(ROOT / "examples" / "demo.yaml")
    more = demo.model_copy(update={"budget": demo.budget.model_copy(update={"max_trials": 5}),
                                   "workers": demo.workers.model_copy(update={"count": 7})})
    assert more.identity_json() == demo.identity_json()
    other = demo.model_copy(update={"merge": demo.merge.model_copy(update={"seed": 1})})
    assert other.identity_json() != demo.identity_json()


def test_demo_routing_studies_prepare() -> None:
    """`evomerge demo --routing`: a DFS study over the experts and a PS+DFS study over the PS
    demo's model and the experts; both validate and build their spaces without a search."""
    from evomerge.search.app.commands import prepare
    from evomerge.search.app.demo import _routing_demos
    from evomerge.search.dfs_space import RouteSpace
    from evomerge.search.space import SearchSpace

    demo = load_config(ROOT / "demo" / "demo.yaml")
    (label_a, dfs), (label_b, both) = _routing_demos(demo)
    assert (label_a, label_b) == ("dfs", "ps+dfs") and dfs.study == "demo-dfs"
    space = prepare(dfs).space
    assert isinstance(space, RouteSpace) and space.models == ("cipher_a", "cipher_b")
    assert space.decode(space.x0()).route == tuple(("cipher_a", i) for i in range(4))
    assert both.dfs.models == ["ps", "cipher_a", "cipher_b"] and both.dfs.ps_study == "demo"
    assert isinstance(prepare(both).space, SearchSpace)  # the PS stage is named, not re-run
