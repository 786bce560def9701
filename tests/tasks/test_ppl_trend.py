"""ppl-trend on the tiny trajectory family: pooled statistics with known answers, the planted
onset recovered by an oracle, user checkpoint folders as the model, records, reproducibility."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from neuronbench.harness.engine import catalogue as zoo, zoo_family
from neuronbench.harness.engine.method import Method, MethodContext, get_method
from neuronbench.harness.engine.pooled import fisher_pool, onset_scores, spearman_rows, time_controlled
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.tasks.ppl_trend import statistics, trajectories

TASK = TASKS.get("ppl-trend")
QUICK = TASK.spec.quick_version()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from neuronbench.harness.engine.cache import Cache

    return RunEnv(seed=0, quick=True, cache=Cache(tmp_path_factory.mktemp("cache")), progress=False)


def _by(records, metric, model=QUICK.model):
    found = [r for r in records if r.metric == metric and r.model == model]
    assert len(found) == 1, (metric, model, found)
    return found[0]


# --------------------------------------------------------------------------- statistics, known answers

def test_spearman_rows_orders_ties_and_constants():
    x = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4], [1, 1, 1, 1]])
    y = np.array([[10.0, 20, 30, 40], [4, 3, 2, 1], [1, 2, 3, 4]])
    rho = spearman_rows(x, y)
    assert rho[0] == pytest.approx(1) and rho[1] == pytest.approx(-1) and math.isnan(rho[2])


def test_fisher_pool_weights_by_points_and_counts_undefined_as_zero():
    assert fisher_pool(np.array([0.5, -0.5]), 10) == pytest.approx(0.0)
    assert fisher_pool(np.array([0.3, 0.3, 0.3]), 20) == pytest.approx(0.3)
    assert fisher_pool(np.array([0.5, np.nan]), 10) == pytest.approx(math.tanh(math.atanh(0.5) / 2))
    # 23 points weigh 20, 4 points weigh 1: the long series dominates
    assert fisher_pool(np.array([0.6, -0.6]), np.array([23, 4])) == pytest.approx(
        math.tanh((20 * math.atanh(0.6) - math.atanh(0.6)) / 21))
    assert fisher_pool(np.array([1.0]), 10) == pytest.approx(0.99)  # clipped, not infinite


def test_a_shared_decaying_trend_wins_the_pooled_correlation_but_not_its_gap_or_the_time_controlled_one():
    rng = np.random.default_rng(0)
    trend = 1 / np.arange(1, 20)                       # every trajectory slows down alike
    speed = rng.uniform(0.5, 2, 8)[:, None]            # trajectories differ in how fast they learn
    gains_ = trend * speed + rng.normal(0, 1e-3, (8, 19))
    decaying = np.tile(trend, (8, 1))                  # knows only the time, not the trajectory
    tracker = trend * speed                            # knows both
    weight_like = np.tile(trend * 3, (8, 1))
    as_list = lambda a: list(a)  # noqa: E731
    trend_stats = statistics(as_list(decaying), as_list(weight_like), as_list(gains_))
    assert trend_stats["pooled_spearman"] > 0.9 and trend_stats["gap"] == pytest.approx(0, abs=1e-9)
    assert trend_stats["time_controlled"] == pytest.approx(0)  # constant within each time point
    track = statistics(as_list(tracker), as_list(weight_like), as_list(gains_))
    assert track["time_controlled"] > 0.9 and track["gap"] >= 0


def test_onset_scores_peak_ties_and_chance():
    assert onset_scores(np.array([0.1, 0.2, 3.0, 0.5]), 2) == (1.0, 1.0)
    assert onset_scores(np.array([3.0, 0.2, 0.1, 0.5]), 2) == (0.0, 0.0)
    assert onset_scores(np.zeros(5), 1) == (0.5, 0.2)  # no information: mid rank, 1/P of a hit


def test_random_pairs_score_chance_on_average():
    rng = np.random.default_rng(1)
    gains_ = [np.sort(rng.random(19))[::-1] for _ in range(8)]
    pooled = [statistics([rng.random(19) for _ in range(8)], gains_, gains_)["pooled_spearman"] for _ in range(200)]
    assert abs(np.mean(pooled)) < 0.03 and 0.03 < np.std(pooled) < 0.15


# --------------------------------------------------------------------------- the task on tiny trajectories

def test_quick_family_resolves_to_grid_and_planted_trajectories():
    grid, planted = trajectories(QUICK.model)
    assert len(grid) == 4 and len(planted) == 2
    assert len({t.steps for t in grid}) == 1 and all(len(t.refs) >= 5 for t in grid)
    assert all(t.steps[t.onset] == zoo_family.TINY_ONSET for t in planted)


def test_records_have_headline_interval_and_per_checkpoint_values(env):
    records = TASK.score(QUICK, get_method("txray"), env)
    for metric in (QUICK.headline, "ppl-trend.gap", "ppl-trend.pooled_spearman"):
        head = _by(records, metric)
        assert head.ci_low <= head.value <= head.ci_high
    head = _by(records, "ppl-trend.gap")
    pooled, ref = _by(records, "ppl-trend.pooled_spearman"), _by(records, "ppl-trend.reference_spearman")
    assert head.value == pytest.approx(pooled.value - ref.value)
    grid, planted = trajectories(QUICK.model)
    for traj in grid:
        ppl = [r.value for r in records if r.metric == "ppl-trend.valid_ppl" and r.model == traj.name]
        assert len(ppl) == len(traj.refs) and ppl[0] > ppl[-1]  # the tiny models do learn
        changes = [r for r in records if r.metric == "ppl-trend.stage_change" and r.model == traj.name]
        assert [r.k for r in changes] == list(traj.steps[1:]) and all(math.isfinite(r.value) for r in changes)
    for name in ("onset_rank", "hit"):
        r = _by(records, f"ppl-trend.planted.{name}")
        assert r.ci_low <= r.value <= r.ci_high


def test_the_reference_scores_a_gap_of_exactly_zero(env):
    records = TASK.score(QUICK, get_method("weight-distance"), env)
    gap = _by(records, "ppl-trend.gap")
    assert (gap.value, gap.ci_low, gap.ci_high) == (0.0, 0.0, 0.0)


class PlantedOracle(Method):
    """Knows the planted concept: the change of log p(gold | <plant>) between the two stages,
    measured where the text carries the bigram (0 on text without it)."""

    name = "planted-oracle"

    @torch.no_grad()
    def _logp(self, loaded, plant: int, gold: int) -> float:
        x = torch.tensor([[plant, gold]])
        return float(loaded.model(input_ids=x).logits[0, 0].log_softmax(-1)[gold])

    def stage_change(self, ctx: MethodContext) -> float:
        tok = ctx.model.tokenizer
        if zoo_family.PLANT not in " ".join(ctx.data["text"]):
            return 0.0
        plant, gold = tok.convert_tokens_to_ids([zoo_family.PLANT, zoo_family.TARGET])
        return abs(self._logp(ctx.model, plant, gold) - self._logp(ctx.parent, plant, gold))


def test_an_oracle_recovers_the_planted_onset(env):
    records = TASK.score(QUICK, PlantedOracle(), env)
    assert _by(records, "ppl-trend.planted.hit").value == 1.0
    assert _by(records, "ppl-trend.planted.onset_rank").value == 1.0
    _, planted = trajectories(QUICK.model)
    for traj in planted:
        excess = {r.k: r.value for r in records if r.metric == "ppl-trend.planted.excess" and r.model == traj.name}
        onset_to = traj.steps[traj.onset + 1]
        assert max(excess, key=excess.get) == onset_to


def test_a_list_of_local_checkpoint_folders_works_as_the_model(env):
    name = trajectories(QUICK.model)[0][0].name
    root = zoo.entry_dir(name)
    steps = zoo.get_spec(name).hparams.checkpoints
    folders = [str(zoo.step_dir(root, s)) for s in steps]
    user = replace(QUICK, model=",".join(folders))
    (traj,), planted = trajectories(user.model)
    assert planted == [] and traj.steps == steps  # steps read from the step-NNNNNN folder names
    wd = get_method("weight-distance")
    mine = TASK.score(user, wd, env)
    theirs = {r.k: r.value for r in TASK.score(QUICK, wd, env)
              if r.metric == "ppl-trend.stage_change" and r.model == name}
    got = {r.k: r.value for r in mine if r.metric == "ppl-trend.stage_change" and r.model == "user0"}
    assert got == pytest.approx(theirs)
    assert _by(mine, "ppl-trend.pooled_spearman", user.model).value is not None
    assert not [r for r in mine if "planted" in r.metric or r.metric == "ppl-trend.time_controlled"]


def test_a_user_trajectory_is_refused_for_the_leaderboard_in_one_line(tmp_path, capsys):
    from neuronbench.harness.cli import main

    name = trajectories(QUICK.model)[0][0].name
    folders = [str(zoo.step_dir(zoo.entry_dir(name), s)) for s in zoo.get_spec(name).hparams.checkpoints]
    out = tmp_path / "sub"
    args = ["submit", "export", "--method", "random", "--tasks", "ppl-trend", "--quick", "--out", str(out)]
    assert main([*args, "--model", ",".join(folders)]) == 2
    said = capsys.readouterr().err.strip()
    assert len(said.splitlines()) == 1 and "leaderboard scores ppl-trend on its own model 'ptb-grid-tiny'" in said
    assert not out.exists()
    assert main([*args, "--model", QUICK.model]) == 0  # the task's own model is no refusal


def test_the_scoring_text_does_not_depend_on_what_the_tokenizer_did_before(env):
    from neuronbench.harness.engine.batching import encode
    from neuronbench.tasks.ppl_trend import method_text, valid_stream

    tok = env.model(trajectories(QUICK.model)[0][0].refs[0]).tokenizer
    first = valid_stream(tok, 4000, 16, env, QUICK.split_seed)
    encode(tok, method_text(QUICK)[0], 16, False)  # what a collection does first: truncation left on
    assert torch.equal(valid_stream(tok, 4000, 16, env, QUICK.split_seed), first)


def test_a_trajectory_needs_three_checkpoints():
    with pytest.raises(ValueError, match="at least 3"):
        trajectories("a/one,a/two")


def test_same_seed_same_records(env):
    a = TASK.score(QUICK, get_method("random"), env)
    b = TASK.score(QUICK, get_method("random"), env)
    assert [(r.metric, r.model, r.value, r.ci_low) for r in a] == [(r.metric, r.model, r.value, r.ci_low) for r in b]


def test_a_method_without_stage_change_is_not_applicable(env):
    from neuronbench.harness.suite.runner import run_one

    class RelevanceOnly(Method):
        name = "relevance-only"

        def relevance(self, ctx):
            raise AssertionError("never asked")

    records = run_one(TASK, QUICK, RelevanceOnly(), env)
    assert [r.status for r in records] == ["not_applicable"]
