"""Tests for the `txray-prune` task: the quick spec end to end, per-site sets and tie accounting, an
oracle that must move accuracy beyond random units, and the not-applicable path (tiny models)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from neuronbench.harness.engine import data
from neuronbench.harness.engine.method import Method, get_method
from neuronbench.harness.engine.sites import NeuronIndex, Site
from neuronbench.harness.suite.runner import RunConfig, resolved_specs, run_one, run_suite
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.tasks import txray_prune
from neuronbench.tasks.prune import PrunePlan
from conftest import quick_zoo_home

from .test_prune import SHARP, Oracle, StagesOnly, sharp  # noqa: F401  (the sharp classifier fixture)

QUICK = txray_prune.SPEC.quick_version()


@pytest.fixture(scope="module")
def quick_home(tmp_path_factory):
    with quick_zoo_home(tmp_path_factory, "txray-prune-home", QUICK.model) as home:
        yield home


def _sharp_run(model, method: Method, tmp_cache=None, **params):
    spec = dataclasses.replace(QUICK, model=SHARP, parent=None,
                               params=tuple({**dict(QUICK.params), **params}.items()))
    env = RunEnv(seed=0, cache=tmp_cache, progress=False, _models={SHARP: model})
    return run_one(TASKS.get("txray-prune"), spec, method, env)


def _by_metric(records):
    return {(r.metric, r.k): r for r in records}


def test_the_default_prunes_the_head_read_state_only(quick_home, tmp_cache):
    env = RunEnv(seed=0, quick=True, cache=tmp_cache, progress=False)
    got = _by_metric(run_one(TASKS.get("txray-prune"), QUICK, get_method("random"), env))
    assert (QUICK.headline, None) in got and ("txray-prune.head.least_vs_random", None) in got
    assert not [m for m, _ in got if m.startswith("txray-prune.ffn")]


def test_set_runs_the_ffn_configuration_and_changes_the_fingerprint(quick_home, tmp_cache):
    frame, config = run_suite(RunConfig(tasks=("txray-prune",), methods=("random",), quick=True,
                                        params=("txray-prune.ffn_config=true", "txray-prune.ks=[0.2]")),
                              progress=False)
    recorded = dict(config["tasks"]["txray-prune"]["params"])
    assert recorded["ffn_config"] is True and tuple(recorded["ks"]) == (0.2,) and config["config"]["params"] == (
        "txray-prune.ffn_config=true", "txray-prune.ks=[0.2]")
    assert set(frame["config_hash"]) == {QUICK.with_params(ffn_config=True, ks=(0.2,)).fingerprint()}
    assert "txray-prune.ffn.most_vs_random" in set(frame["metric"]) and set(frame["k"].drop_nulls()) == {0.2}


def test_set_changes_each_named_task_of_a_run():
    tasks = [TASKS.get("prune"), TASKS.get("txray-prune")]
    specs = resolved_specs(tasks, RunConfig(quick=True, params=("txray-prune.ffn_config=true", "prune.ks=[0.1]")),
                           RunEnv(seed=0, quick=True, progress=False))
    assert dict(specs["txray-prune"].params)["ffn_config"] is True and dict(specs["prune"].params)["ks"] == (0.1,)
    assert dict(specs["txray-prune"].params)["ks"] == dict(QUICK.params)["ks"]


@pytest.mark.parametrize("setting, message", [
    ("txray-prune.nope=1", "has no parameter 'nope'"), ("prune.ks=[0.1]", "task 'prune' is not in this run"),
    ("txray-prune.ks", "write TASK.PARAM=VALUE"), ("txray-prune.random_seeds=0", "random_seeds"),
])
def test_bad_settings_are_refused_before_any_work(setting, message, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_suite(RunConfig(tasks=("txray-prune",), methods=("random",), quick=True, params=(setting,),
                            out=str(out)), progress=False)
    assert not out.exists()


def test_quick_spec_runs_with_both_configurations_and_intervals(quick_home, tmp_cache):
    env = RunEnv(seed=0, quick=True, cache=tmp_cache, progress=False)
    records = run_one(TASKS.get("txray-prune"), QUICK.with_params(ffn_config=True), get_method("random"), env)
    got = _by_metric(records)
    assert (QUICK.headline, None) in got and ("txray-prune.ffn.most_vs_random", None) in got
    for r in records:
        if r.ci_low is not None:
            assert r.ci_low <= r.value <= r.ci_high, r
    layers = range(env.model(QUICK.model).num_layers)
    for prefix in ["head"] + [f"ffn.{layer}" for layer in layers]:
        for k in dict(QUICK.params)["ks"]:
            for kind in ("most", "least", "random"):
                assert (f"txray-prune.{prefix}.delta_acc.{kind}", k) in got
            assert (f"txray-prune.{prefix}.least_tie_broken_share", k) in got


def test_sets_stay_in_their_site_and_ties_are_counted():
    index = NeuronIndex.build({Site.ffn(0): 10, Site.ffn(1): 20})
    scores = torch.arange(30.0)
    scores[10:20] = 0.0  # half of site 1 tied at its bottom
    plan = PrunePlan()
    ties = {s: txray_prune.add_site_sets(plan, index, s, scores, (0.2, 0.5), 3, seed=0) for s in index.sites}
    for site, lo, hi in ((Site.ffn(0), 0, 10), (Site.ffn(1), 10, 30)):
        for k in (0.2, 0.5):
            for kind in ("most", "least", "random"):
                for row in plan.rows[(f"{site}/{kind}", k)]:
                    chosen = plan.sets[row]
                    assert len(chosen) == round(k * (hi - lo)) and ((chosen >= lo) & (chosen < hi)).all()
    assert sorted(plan.sets[plan.rows[(f"{Site.ffn(0)}/most", 0.2)][0]]) == [8, 9]
    assert ties[Site.ffn(0)][("least", 0.2)] == 0  # distinct scores: no tie-break
    assert ties[Site.ffn(1)][("least", 0.2)] == 1.0  # 4 of 10 tied units picked by the tie-break
    assert ties[Site.ffn(1)][("least", 0.5)] == 0  # the whole tied block fits in the set


def test_an_oracle_moves_accuracy_beyond_random_units(sharp, tmp_cache):  # noqa: F811
    test = data.subsample(data.load("polarity").splits["test"], dict(QUICK.params)["n_test"], QUICK.split_seed)
    params = dict(ffn_config=False, ks=(0.2, 0.5), random_seeds=6)
    got = _by_metric(_sharp_run(sharp, Oracle(test), tmp_cache, **params))
    chance = _by_metric(_sharp_run(sharp, get_method("random"), tmp_cache, **params))
    head = got[(QUICK.headline, None)]
    # Zeroing the units whose ablation alone costs most costs more accuracy than zeroing random ones
    # or the least costly ones (the random sets' spread on this tiny model keeps the interval wide).
    assert head.value < 0 and head.value < chance[(QUICK.headline, None)].value
    for k in params["ks"]:
        most, least = (got[(f"txray-prune.head.delta_acc.{kind}", k)].value for kind in ("most", "least"))
        assert most < least, (k, most, least)


def test_a_method_without_relevance_gets_a_not_applicable_record(sharp, tmp_cache):  # noqa: F811
    (only,) = _sharp_run(sharp, StagesOnly(), tmp_cache)
    assert only.metric == "txray-prune.not_applicable" and only.status == "not_applicable"


def test_bad_parameters_are_rejected(sharp):  # noqa: F811
    with pytest.raises(ValueError, match="random_seeds"):
        txray_prune.Params(ks=(0.1,), random_seeds=0, n_test=8, bootstrap=10, ffn_config=False)
    assert np.isfinite(txray_prune.tie_broken(np.zeros(3), np.array([0])))
