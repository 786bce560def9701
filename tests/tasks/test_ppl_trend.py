"""ppl-trend on the tiny trajectory: correlation mechanics, records, reproducibility."""
import math

import numpy as np
import pytest

from neuronbench.harness.engine.catalogue import steps as checkpoints
from neuronbench.harness.engine.method import Method, get_method
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.tasks.ppl_trend import _correlations

TASK = TASKS.get("ppl-trend")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from neuronbench.harness.engine.cache import Cache

    return RunEnv(seed=0, quick=True, cache=Cache(tmp_path_factory.mktemp("cache")), progress=False)


def test_correlation_of_a_perfect_tracker_is_one():
    # Three checkpoints whose log-perplexity falls by 3 then 1 (per token); a method reporting
    # changes in the same order correlates perfectly, the reverse order anti-correlates.
    losses = np.array([[10.0, 10.0], [7.0, 7.0], [6.0, 6.0], [5.9, 5.9]])
    rho, tau = _correlations(np.array([3.0, 1.0, 0.1]), losses, tokens_per_block=1)
    assert rho == pytest.approx(1.0) and tau == pytest.approx(1.0)
    rho, _ = _correlations(np.array([0.1, 1.0, 3.0]), losses, tokens_per_block=1)
    assert rho == pytest.approx(-1.0)


def test_records_have_headline_interval_and_per_checkpoint_values(env):
    spec = TASK.spec.quick_version()
    records = TASK.score(spec, get_method("weight-distance"), env)
    head = [r for r in records if r.metric == spec.headline]
    assert len(head) == 1 and head[0].ci_low <= head[0].value <= head[0].ci_high
    ppl = [r.value for r in records if r.metric == "ppl-trend.valid_ppl"]
    assert len(ppl) == len(checkpoints(spec.model)) >= 3
    assert ppl[0] > ppl[-1]  # the tiny model does learn
    changes = [r for r in records if r.metric == "ppl-trend.stage_change"]
    assert len(changes) == len(ppl) - 1 and all(math.isfinite(r.value) and r.value > 0 for r in changes)


def test_same_seed_same_records(env):
    spec = TASK.spec.quick_version()
    a = TASK.score(spec, get_method("random"), env)
    b = TASK.score(spec, get_method("random"), env)
    assert [(r.metric, r.value, r.ci_low) for r in a] == [(r.metric, r.value, r.ci_low) for r in b]


def test_a_method_without_stage_change_is_not_applicable(env):
    from neuronbench.harness.suite.runner import run_one

    class RelevanceOnly(Method):
        name = "relevance-only"

        def relevance(self, ctx):
            raise AssertionError("never asked")

    records = run_one(TASK, TASK.spec.quick_version(), RelevanceOnly(), env)
    assert [r.status for r in records] == ["not_applicable"]
