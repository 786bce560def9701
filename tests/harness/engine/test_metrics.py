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
