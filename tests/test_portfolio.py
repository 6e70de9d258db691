"""merge.method / granularity auto: the portfolio optimizer moves the budget to the arm that
leads (successive halving), opens the finer arm of the last one when it stalls, and is rebuilt
from what the ledger keeps; the portfolio space maps genomes to ordinary one-method recipes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from evomerge.search.config import ConfigError, MergeConfig
from evomerge.search.families import FAMILIES, families, fine_group_size
from evomerge.search.optimizers import Arm, Evaluated, OptimizerSettings, build_optimizer
from evomerge.search.optimizers.base import arm_code, arm_index
from evomerge.search.optimizers.portfolio import Portfolio
from evomerge.search.portfolio import PortfolioSpace
from evomerge.workers.recipe import MergeRecipe

Value = Callable[[int, np.ndarray], float]


def _settings(arms: tuple[Arm, ...], stream: int = 0) -> OptimizerSettings:
    return OptimizerSettings(dim=1 + max(a.dim for a in arms), objectives=1, seed=3, popsize=6, sigma0=0.2,
                             x0=(0.5,) * (1 + max(a.dim for a in arms)), diagonal=False, restarts=2, stream=stream,
                             arms=arms)


def _drive(opt: Portfolio, n: int, value: Value, lag: int = 2,
           documents: int | None = None) -> tuple[list[list[Evaluated]], list[Evaluated]]:
    """Ask ``n`` genomes and tell each ``lag`` asks late, each value resting on ``documents``;
    returns what a ledger keeps."""
    by_key: dict[int, Evaluated] = {}
    updates: list[list[int]] = []
    pending: list[Evaluated] = []
    for key in range(n):
        p = opt.ask()
        arm = arm_index(p.x[0], len(opt.arms))
        genes = np.asarray(p.x[1:1 + opt.arms[arm].dim])
        pending.append(Evaluated(key, p.x, (value(arm, genes),), p.generation, documents=documents))
        if len(pending) > lag:
            result = pending.pop(0)
            by_key[result.key] = result
            update = opt.tell(result)
            if update is not None:
                updates.append(list(update.keys))
    for result in pending:  # the last ones come in too
        by_key[result.key] = result
        update = opt.tell(result)
        if update is not None:
            updates.append(list(update.keys))
    told = {k for u in updates for k in u}
    return [[by_key[k] for k in u] for u in updates], [r for k, r in sorted(by_key.items()) if k not in told]


def _arms(*dims: int) -> tuple[Arm, ...]:
    return tuple(Arm(f"arm{i}", d, 6, (0.5,) * d) for i, d in enumerate(dims))


def test_successive_halving_moves_the_budget_to_the_best_arm() -> None:
    peaks = (0.2, 0.9, 0.5, 0.4)  # arm 1 can reach the most

    def value(arm: int, x: np.ndarray) -> float:
        return peaks[arm] - float(np.sum((np.clip(x, 0, 1) - 0.3) ** 2))

    opt = build_optimizer("cma", _settings(_arms(2, 3, 2, 3)))
    assert isinstance(opt, Portfolio) and opt.origin == "cma"
    _drive(opt, 120, value)
    assert opt.competing == [1]
    spent = Counter({i: len(r.values) for i, r in enumerate(opt._records)})
    assert spent[1] > 60 and all(spent[i] <= 2 * 6 + 2 for i in (0, 2, 3)), spent
    # every arm had its first generation before any was dropped: equal evidence
    assert all(spent[i] >= 6 for i in range(4))
    assert "arm1" in opt.describe()


def test_the_finer_arm_opens_at_the_best_coarse_genome_when_the_last_arm_stalls() -> None:
    arms = (Arm("coarse", 1, 6, (0.5,)), Arm("fine", 2, 6, (0.5, 0.5), refines=0, expand=(0, 0)))

    def value(arm: int, x: np.ndarray) -> float:
        x = np.clip(x, 0, 1)
        if arm == 0:  # one gene for both layers: the best is at 0.7, worth 0.5
            return 0.5 - float((x[0] - 0.7) ** 2)
        return 0.5 - float((x[0] - 0.7) ** 2) + 0.4 * float(x[0] - x[1])  # layers apart pay

    opt = build_optimizer("cma", _settings(arms))
    assert isinstance(opt, Portfolio)
    _drive(opt, 20, value)
    assert opt.competing == [0]
    updates, rest = _drive(opt, 200, value)
    assert opt.competing == [1], "the coarse arm stalled, and the fine arm won the round beside it"
    fine = opt._records[1]
    assert fine.values and max(fine.values) > 0.6  # it found what one gene per model cannot
    x0 = opt._subs[1].settings.x0  # both layers start at the coarse arm's best value when it opened
    assert x0[0] == x0[1] and abs(x0[0] - 0.7) < 0.1


def test_a_restored_portfolio_has_the_same_allocation() -> None:
    peaks = (0.3, 0.8, 0.5)
    arms = _arms(2, 2, 3) + (Arm("arm1-fine", 4, 8, (0.5,) * 4, refines=1, expand=(0, 0, 1, 1)),)

    def value(arm: int, x: np.ndarray) -> float:
        return (peaks[min(arm, 1)] if arm < 3 else 0.8) - float(np.sum((np.clip(x, 0, 1) - 0.4) ** 2))

    opt = build_optimizer("cma", _settings(arms))
    updates, rest = _drive(opt, 150, value)
    fresh = build_optimizer("cma", _settings(arms, stream=150))
    assert isinstance(opt, Portfolio) and isinstance(fresh, Portfolio)
    fresh.restore(updates, rest)
    assert (fresh.competing, fresh.rung, sorted(fresh._subs)) == (opt.competing, opt.rung, sorted(opt._subs))
    assert [len(r.values) for r in fresh._records] == [len(r.values) for r in opt._records]
    for _ in range(10):  # it proposes on from there
        p = fresh.ask()
        assert arm_index(p.x[0], len(arms)) in fresh.competing


@pytest.mark.parametrize("name", ["random", "tpe"])
def test_any_registered_optimizer_searches_each_arm(name: str) -> None:
    opt = build_optimizer(name, _settings(_arms(2, 3)))
    assert isinstance(opt, Portfolio) and opt.origin == name
    _drive(opt, 30, lambda arm, x: float(arm) - float(np.sum(x ** 2)))
    assert opt.competing == [1]


def test_auto_families_depend_on_the_experts_and_transforms() -> None:
    assert families("ties", 2) == ("ties",)
    assert "slerp" not in families("auto", 2) and "model_stock" in families("auto", 2)
    assert families("auto", 1) == tuple(f for f in FAMILIES if f != "model_stock")
    assert "model_stock" not in families("auto", 2, ["lines"])
    assert fine_group_size(4) == 2 and fine_group_size(4, 1) == 1 and fine_group_size(32) == 4


def test_auto_is_the_default_and_checks_parameters_against_every_family() -> None:
    m = MergeConfig()
    assert (m.method, m.granularity, m.coarse_granularity) == ("auto", "auto", "model")
    MergeConfig(ranges={"gamma": (0.0, 0.1)})  # Breadcrumbs' parameter: some family has it
    with pytest.raises(ValueError, match="no parameter 'lambda'"):
        MergeConfig(ranges={"lambda": (0.0, 1.0)})
    with pytest.raises(ValueError, match="unknown merge method 'tie'"):
        MergeConfig(method="tie")
    assert issubclass(ConfigError, ValueError)


def test_portfolio_space_genomes_are_ordinary_recipes_of_one_method() -> None:
    space = PortfolioSpace.build(families("auto", 2), "base", ("a", "b"), 4, layout="model", group_size=None,
                                 fine=True, ranges={"weight": (0.0, 2.0)})
    arms = space.arms(None, 0.5)
    labels = [a.label for a in arms]
    assert labels[:5] == ["task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties", "consensus"]
    assert labels[5:] == [f"{m}[layer_group]{how}" for m in labels[:5] for how in ("", " (from untuned)")]
    assert [(a.refines, a.seeded) for a in arms[5:7]] == [(0, True), (0, False)]
    assert arms[6].x0 == tuple(space.spaces[6].initial(0.5))  # the family's untuned merge, per layer group
    untuned = [r for _, r in space.baselines(["base", "a", "b"], 0.5, True) if isinstance(r, MergeRecipe)]
    assert [r.method for r in untuned] == ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs_ties",
                                           "consensus", "model_stock"]
    for recipe in untuned[1:6]:  # each family's untuned merge is a genome of its arm, and back
        x = space.genome_of(recipe)
        assert x is not None and space.decode(x, recipe.label) == recipe
    fine = space.decode((arm_code(7, len(space.spaces)),) + (0.25,) * 12)
    assert isinstance(fine, MergeRecipe) and fine.method == "ties" and fine.layout == "layer_group"
    assert space.genome_of(fine) is not None and not space.spaces[1].belongs(fine)
    shown = space.params_of(fine)
    assert len(shown) == 12 and all(n.startswith("ties[layer_group].") for n in shown)
    assert set(shown) <= set(space.bounds())


def test_the_leaderboard_counts_the_evaluations_per_family() -> None:
    from evomerge.search.app.leaderboard import budget_by_family
    from evomerge.storage.repository import CandidateRecord

    def cand(i: int, method: str, layout: str, fitness: float | None, origin: str = "cma") -> CandidateRecord:
        recipe = MergeRecipe(method=method, base="base", models=("a", "b"), layout=layout,  # type: ignore[arg-type]
                             group_size=1 if layout == "layer_group" else None)
        return CandidateRecord(id=i, trial_number=i, origin=origin, generation=None, genes=None,
                               recipe_json=recipe.to_json(), recipe_hash=recipe.content_hash,
                               state="complete" if fitness is not None else "failed", duplicate_of=None,
                               scores=None, fitness=fitness, heldout=None, heldout_fitness=None, materialize_s=None,
                               evaluate_s=None, worker=None, attempt=1, error=None)

    rows = budget_by_family([cand(1, "ties", "model", 0.5), cand(2, "ties", "model", 0.7),
                             cand(3, "ties", "layer_group", None), cand(4, "task_arithmetic", "model", 0.6),
                             cand(5, "dare_ties", "model", 0.9, origin="untuned")])
    assert rows == [("ties", 2, 0.7), ("task_arithmetic", 1, 0.6), ("ties[layer_group]", 1, None)]


def test_a_plateau_that_returns_the_same_best_is_a_stall() -> None:
    arms = (Arm("coarse", 1, 4, (0.5,)), Arm("fine", 2, 4, (0.5, 0.5), refines=0, expand=(0, 0)))
    opt = build_optimizer("cma", _settings(arms))
    assert isinstance(opt, Portfolio)
    _drive(opt, 30, lambda arm, x: 0.5 if arm == 0 else 0.6)  # the coarse arm can never do better
    assert opt.competing == [1]


@pytest.mark.parametrize("documents, coarse_keeps", [(None, True), (100_000, True), (300, False)])
def test_a_coarse_arm_keeps_the_budget_after_the_round_only_if_it_climbs_beyond_the_noise(
        documents: int | None, coarse_keeps: bool) -> None:
    arms = (Arm("coarse", 1, 4, (0.5,)), Arm("fine", 2, 4, (0.5, 0.5), refines=0, expand=(0, 0)))
    told = {0: 0}

    def value(arm: int, x: np.ndarray) -> float:  # the coarse arm stalls once, then climbs on
        told[0] += 1
        return (0.5 if told[0] < 20 else 0.5 + told[0] / 1000) if arm == 0 else 0.45

    opt = build_optimizer("cma", _settings(arms))
    assert isinstance(opt, Portfolio)
    _drive(opt, 60, value, documents=documents)
    assert 1 in opt._subs, "the fine arm had its round"
    # a climb of 0.001 per result is progress on 100,000 documents (a standard error of 0.0016
    # at 0.5) but noise on 300 (0.029): there the round left the coarse arm stalled, and it lost
    assert opt.competing == ([0] if coarse_keeps else [1])


def test_gains_within_the_noise_do_not_put_off_the_stall() -> None:
    arms = (Arm("coarse", 1, 4, (0.5,)), Arm("fine", 2, 4, (0.5, 0.5), refines=0, expand=(0, 0)))
    told = {0: 0}

    def value(arm: int, x: np.ndarray) -> float:  # one more document of 300 right every other result
        told[0] += 1
        return 0.34 + (told[0] // 2) / 300 if arm == 0 else 0.3

    opened = {}
    for documents in (None, 300):
        opt = build_optimizer("cma", _settings(arms))
        assert isinstance(opt, Portfolio)
        told[0] = 0
        for n in range(1, 41):
            _drive(opt, 1, value, lag=0, documents=documents)
            if 1 in opt._subs:
                opened[documents] = n
                break
    # told the documents, the creep is a stall 2 generations of 4 after the first result; untold, it never is
    assert opened == {300: 9}


def test_a_coarse_arm_that_stays_stalled_through_its_round_loses_it() -> None:
    arms = (Arm("coarse", 1, 4, (0.5,)), Arm("fine", 2, 4, (0.5, 0.5), refines=0, expand=(0, 0)))
    opt = build_optimizer("cma", _settings(arms))
    assert isinstance(opt, Portfolio)
    # the fine arm is worse in its round, but the coarse arm only repeats its best
    _drive(opt, 60, lambda arm, x: 0.5 if arm == 0 else 0.4)
    assert opt.competing == [1]


def test_a_finer_arm_that_lost_its_round_resumes_when_the_coarser_arm_stalls_again() -> None:
    arms = (Arm("coarse", 1, 4, (0.5,)), Arm("fine", 2, 4, (0.5, 0.5), refines=0, expand=(0, 0)))
    coarse_told = {0: 0}

    def value(arm: int, x: np.ndarray) -> float:  # the coarse arm improves once, in the first round
        if arm == 1:
            return 0.4
        coarse_told[0] += 1
        return 0.55 if coarse_told[0] >= 13 else 0.5

    opt = build_optimizer("cma", _settings(arms))
    assert isinstance(opt, Portfolio)
    states, subs = [], []
    for _ in range(40):
        _drive(opt, 2, value, lag=0)
        if not states or states[-1] != opt.competing:
            states.append(list(opt.competing))
            subs.append(opt._subs.get(1))
    assert states == [[0], [0, 1], [0], [0, 1], [1]], "coarse won the first round, lost the second"
    assert subs[1] is subs[3], "the second round resumed the finer arm's own search"


def test_the_finer_arm_from_the_untuned_merge_wins_where_the_best_coarse_genome_is_a_trap() -> None:
    arms = (Arm("coarse", 1, 4, (0.5,)), Arm("fine", 2, 6, (0.5, 0.5), refines=0, expand=(0, 0)),
            Arm("fine (from untuned)", 2, 6, (0.5, 0.5), refines=0, expand=(0, 0), seeded=False))

    def value(arm: int, x: np.ndarray) -> float:
        x = np.clip(x, 0, 1)
        if arm == 0:  # one gene: a narrow local peak at 0.1, nothing near the middle
            return 0.5 - 5 * float(abs(x[0] - 0.1))
        # per layer: the same trap at (0.1, 0.1), and a broad hill towards (0.9, 0.9), above the
        # trap from the middle on
        trap = 0.5 - 5 * float(abs(x[0] - 0.1) + abs(x[1] - 0.1))
        hill = 0.8 - 0.5 * float((x[0] - 0.9) ** 2 + (x[1] - 0.9) ** 2)
        return max(trap, hill)

    opt = build_optimizer("cma", _settings(arms))
    assert isinstance(opt, Portfolio)
    _drive(opt, 40, value)
    _drive(opt, 120, value)
    assert opt.competing == [2]
    assert opt._subs[2].settings.x0 == (0.5, 0.5) and abs(opt._subs[1].settings.x0[0] - 0.1) < 0.1
    assert max(opt._records[2].values) > 0.75
