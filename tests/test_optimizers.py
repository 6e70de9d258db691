"""The optimizer seam: every optimizer asks inside the box, learns from out-of-order tells,
and is rebuilt from what the ledger keeps (the updates it reported and the outcomes)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.search.optimizers import OPTIMIZERS, Evaluated, Optimizer, OptimizerSettings, build_optimizer
from evomerge.search.optimizers.cmaes import CMAOptimizer


def _settings(dim: int = 3, **kw: object) -> OptimizerSettings:
    base: dict[str, object] = dict(dim=dim, objectives=2, seed=0, popsize=6, sigma0=0.2, x0=(0.5,) * dim,
                                   diagonal=False, restarts=3, stream=0)
    base.update(kw)
    return OptimizerSettings(**base)  # type: ignore[arg-type]


def _values(x: tuple[float, ...]) -> tuple[float, ...]:
    """Two objectives in conflict (distance to 0.2 and to 0.8); their sum is the fitness."""
    a, b = (-float(np.sum((np.asarray(x) - c) ** 2)) for c in (0.2, 0.8))
    return (a, b)


def _drive(opt: Optimizer, n: int, fail_every: int = 7) -> tuple[list[list[Evaluated]], list[Evaluated]]:
    """Ask ``n`` genomes, tell them two steps late and out of order (some failed); returns
    what a ledger would keep: the reported updates, and the outcomes outside any update."""
    by_key: dict[int, Evaluated] = {}
    updates: list[list[int]] = []
    pending: list[Evaluated] = []
    for key in range(n):
        p = opt.ask()
        assert len(p.x) == opt.settings.dim and all(math.isfinite(v) for v in p.x)
        values = None if key % fail_every == fail_every - 1 else _values(p.x)
        if not opt.multi_objective and values is not None:
            values = (sum(values),)
        pending.append(Evaluated(key, p.x, values, p.generation))
        if len(pending) > 2:
            result = pending.pop(key % 2)
            by_key[result.key] = result
            update = opt.tell(result)
            if update is not None:
                updates.append(list(update.keys))
    told = {k for u in updates for k in u}
    return [[by_key[k] for k in u] for u in updates], [r for k, r in sorted(by_key.items()) if k not in told]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_asks_tells_and_restores(name: str) -> None:
    n = 16 if name == "gp" else 60  # GP's cost grows with the cube of the points told
    opt = build_optimizer(name, _settings())
    updates, rest = _drive(opt, n)
    fresh = build_optimizer(name, _settings(stream=n))
    fresh.restore(updates, rest)
    for _ in range(5):  # the rebuilt optimizer proposes and learns on
        p = fresh.ask()
        assert len(p.x) == 3
        fresh.tell(Evaluated(1000, p.x, (0.0, 0.0) if fresh.multi_objective else (0.0,), p.generation))
    assert name in fresh.describe()


def test_random_search_draws_uniformly_in_the_box_and_resumes_on_a_new_stream() -> None:
    first = [build_optimizer("random", _settings(seed=3)).ask().x for _ in range(2)]
    a, b = build_optimizer("random", _settings(seed=3)), build_optimizer("random", _settings(seed=3, stream=50))
    xs = np.array([a.ask().x for _ in range(2000)])
    assert xs.min() >= 0.0 and xs.max() <= 1.0 and abs(xs.mean() - 0.5) < 0.02
    assert first[0] == first[1]  # same seed, same stream: same first draw
    assert a.ask().x != b.ask().x


def test_cma_restore_reproduces_the_distribution() -> None:
    opt = CMAOptimizer(_settings())
    updates, rest = _drive(opt, 90)
    assert len(updates) >= 10
    fresh = CMAOptimizer(_settings(stream=90))
    fresh.restore(updates, rest)
    np.testing.assert_allclose(fresh._run().mean, opt._run().mean, rtol=1e-9, atol=1e-12)
    assert fresh._run().generation == opt._run().generation


def test_cma_starts_at_the_best_prior() -> None:
    opt = CMAOptimizer(_settings(sigma0=1e-6))
    opt.tell(Evaluated(1, (0.9, 0.9, 0.9), (0.1,), prior=True))
    opt.tell(Evaluated(2, (0.2, 0.3, 0.4), (0.7,), prior=True))
    opt.tell(Evaluated(3, (0.6, 0.6, 0.6), None, prior=True))  # a failed baseline teaches nothing
    np.testing.assert_allclose(opt.ask().x, (0.2, 0.3, 0.4), atol=1e-4)
    plain = CMAOptimizer(_settings(sigma0=1e-6))
    np.testing.assert_allclose(plain.ask().x, (0.5, 0.5, 0.5), atol=1e-4)


def test_cma_shown_before_its_priors_still_starts_at_the_best_and_restores_there() -> None:
    """The controller shows the optimizer (describe) before the baselines it waits for are
    told: that read must not start the run at the configured start, and a restore (priors
    told first) must rebuild the same distribution as the live run."""
    priors = [Evaluated(-1, (0.9, 0.9, 0.9), (0.1,), prior=True), Evaluated(-2, (0.2, 0.3, 0.4), (0.7,), prior=True)]
    opt = CMAOptimizer(_settings(sigma0=1e-6))
    assert "not started" in opt.describe()
    for prior in priors:
        opt.tell(prior)
    np.testing.assert_allclose(opt.ask().x, (0.2, 0.3, 0.4), atol=1e-4)
    live = CMAOptimizer(_settings())
    live.describe()
    for prior in priors:
        live.tell(prior)
    updates, rest = _drive(live, 60)
    fresh = CMAOptimizer(_settings(stream=60))
    fresh.restore(updates, priors + rest)
    np.testing.assert_allclose(fresh._run().mean, live._run().mean, rtol=1e-9, atol=1e-12)


def test_cma_restarts_with_a_doubled_population_and_restores_them() -> None:
    """A flat landscape stagnates: IPOP restarts (popsize 6, 12, 24) up to the configured
    number, and a restore from the stored updates lands in the same run."""
    opt = CMAOptimizer(_settings(restarts=2))
    by_key: dict[int, Evaluated] = {}
    updates: list[list[Evaluated]] = []
    for key in range(1200):
        p = opt.ask()
        by_key[key] = Evaluated(key, p.x, (1.0,), p.generation)
        if (update := opt.tell(by_key[key])) is not None:
            updates.append([by_key[k] for k in update.keys])
    assert opt.restarts == 2 and opt._run().popsize == 24
    assert [len(u) for u in updates][:1] == [6] and 12 in {len(u) for u in updates}
    fresh = CMAOptimizer(_settings(restarts=2, stream=1200))
    fresh.restore(updates, [])
    assert fresh.restarts == 2 and fresh._run().popsize == 24
    np.testing.assert_allclose(fresh._run().mean, opt._run().mean, rtol=1e-9, atol=1e-12)
    assert "restarts 2/2" in fresh.describe()
