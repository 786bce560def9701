"""`metrics.PairedBootstrap` with crossed groups (the pigeonhole bootstrap)."""
from __future__ import annotations

import numpy as np
import pytest

from neuronbench.harness.engine.metrics import PairedBootstrap, bootstrap_ci


def test_one_shared_group_is_the_unit_bootstrap():
    values = np.random.default_rng(0).normal(size=30)
    plain = bootstrap_ci(lambda idx: values[idx].mean(), 30, 300, 4)
    grouped = PairedBootstrap(30, 300, 4, 9, groups=np.ones((30, 1), bool)).ci(values[None, :])
    assert grouped[0] == pytest.approx(values.mean())
    assert grouped[1:] == pytest.approx(plain)


def test_shared_group_noise_widens_the_interval_and_covers_more_often():
    """Units share the noise of the 4 groups they draw from: the unit bootstrap's interval is too
    narrow (it misses the true mean 0 far more often than 5%); resampling the groups too is not."""
    rng = np.random.default_rng(1)
    n, g, miss_units, miss_groups = 40, 4, 0, 0
    member = np.zeros((n, g), bool)
    member[np.arange(n), np.arange(n) % g] = True
    for trial in range(60):
        values = member @ rng.normal(size=g) + 0.2 * rng.normal(size=n)
        lo, hi = bootstrap_ci(lambda idx: values[idx].mean(), n, 200, trial)
        miss_units += not lo <= 0 <= hi
        _, lo, hi = PairedBootstrap(n, 200, trial, 9, groups=member).ci(values[None, :])
        miss_groups += not lo <= 0 <= hi
    assert miss_units > 30 and miss_groups < miss_units / 2, (miss_units, miss_groups)


def test_groups_are_checked():
    with pytest.raises(ValueError, match="every unit in at least one group"):
        PairedBootstrap(3, 10, 0, 0, groups=np.array([[1], [0], [1]], bool))


def _one_set_trial(rng: np.random.Generator, n: int = 48, s: int = 10) -> np.ndarray:
    """(S, n) drop(compared set) - drop(random set s) per text, with no skill: the compared set is
    one more draw from the random sets' distribution, where 1 set in 5 holds a catastrophic unit."""
    def drops(k):
        luck = np.where(rng.random(k) < 0.2, 0.5, 0.0) + 0.02 * rng.normal(size=k)  # set-level
        return luck[:, None] + 0.1 * rng.normal(size=(k, n))  # plus per-text noise

    return drops(1) - drops(s)


def test_one_set_intervals_carry_the_compared_sets_own_luck():
    """A set compared with random sets of its kind: resampling texts and random sets misses the
    compared set's own luck and excludes the true gap 0 far more often than 5%; `one_set` adds it."""
    rng = np.random.default_rng(0)
    miss_rows, miss_one, wider = 0, 0, 0
    for trial in range(80):
        per_seed = _one_set_trial(rng)
        boot = PairedBootstrap(per_seed.shape[1], 200, trial, 3)
        value, lo, hi = boot.ci(per_seed)
        value1, lo1, hi1 = boot.ci(per_seed, one_set=True)
        assert value1 == value and lo1 <= value1 <= hi1
        miss_rows += not lo <= 0 <= hi
        miss_one += not lo1 <= 0 <= hi1
        wider += hi1 - lo1 > hi - lo
    assert miss_rows > 12 and miss_one <= 8 and wider == 80, (miss_rows, miss_one, wider)


def test_one_set_needs_two_reference_rows():
    with pytest.raises(ValueError, match="at least 2 reference rows"):
        PairedBootstrap(5, 10, 0, 0).ci(np.zeros((1, 5)), one_set=True)
