"""The suite runner: every registered task with every registered baseline at --quick scale."""
import polars as pl
import pytest

from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.method import METHODS, get_method
from neuronbench.harness.engine.records import SCHEMA, load_results
from neuronbench.harness.suite.runner import RunConfig, run_one, run_suite, summary
from neuronbench.harness.suite.task import TASKS, RunEnv


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return RunEnv(seed=0, quick=True, cache=Cache(tmp_path_factory.mktemp("cache")), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("task", TASKS.names())
def test_every_task_with_every_baseline_at_quick_scale(env, task, method):
    t = TASKS.get(task)
    spec = t.spec.quick_version()
    records = run_one(t, spec, get_method(method), env)
    assert records, "a task must always leave a record"
    assert all(r.task == task and r.config_hash == spec.fingerprint() for r in records)
    if any(r.status == "not_applicable" for r in records):
        assert len(records) == 1 and not get_method(method).supports(spec.verb) or records[0].value is None
        return
    heads = [r for r in records if r.metric == spec.headline]
    assert len(heads) >= 1, f"{task} gave no headline {spec.headline}"


def test_run_writes_long_format_records_with_config_and_is_reproducible(tmp_path):
    cfg = RunConfig(tasks=("ppl-trend",), methods=("random", "activation"), quick=True, seed=1,
                    out=str(tmp_path / "a"))
    frame, config = run_suite(cfg, progress=False)
    again, _ = run_suite(RunConfig(**{**cfg.__dict__, "out": str(tmp_path / "b")}), progress=False)
    saved, saved_config = load_results(tmp_path / "a")
    assert dict(saved.schema) == SCHEMA
    assert saved_config["versions"]["torch"] and saved_config["harness_version"]
    assert saved_config["fingerprints"]["ppl-trend"] == TASKS.get("ppl-trend").spec.quick_version().fingerprint()
    cols = ["task", "method", "metric", "k", "value", "ci_low", "ci_high"]
    assert frame.select(cols).equals(again.select(cols))
    status = dict(frame.group_by("method").agg(pl.col("status").first()).iter_rows())
    assert status == {"random": "ok", "activation": "not_applicable"}
    table = summary(frame)
    assert set(table["method"]) == {"random", "activation"}
    assert not any("SANITY" in c for c in table.columns)


def test_summary_flags_a_task_whose_sanity_check_failed(tmp_path, monkeypatch):
    from neuronbench.harness.suite import sanity, verdicts

    monkeypatch.setattr(verdicts, "verdict_path", lambda task, fp: tmp_path / f"{task}-{fp}.json")
    spec = TASKS.get("ppl-trend").spec.quick_version()
    frame, _ = run_suite(RunConfig(tasks=("ppl-trend",), methods=("random",), quick=True), progress=False)
    failing = sanity.Check("ppl-trend", "reinit", "m~reinit", 0.9, 0.8, 1.0, 0.0)
    verdicts.store_verdict(spec, [failing])
    assert [c for c in summary(frame).columns if "SANITY FAILED" in c] == ["ppl-trend (ppl-trend.time_controlled) SANITY FAILED"]


def test_changed_spec_changes_fingerprint_and_version_is_part_of_it():
    from dataclasses import replace

    spec = TASKS.get("ppl-trend").spec
    assert replace(spec, params=spec.params + (("extra", 1),)).fingerprint() != spec.fingerprint()
    assert replace(spec, version=spec.version + 1).fingerprint() != spec.fingerprint()


def test_unknown_task_or_method_fails_before_any_work():
    with pytest.raises(KeyError, match="did you mean|Did you mean"):
        run_suite(RunConfig(tasks=("ppl-trnd",)), progress=False)
    with pytest.raises(KeyError, match="Did you mean"):
        run_suite(RunConfig(tasks=("ppl-trend",), methods=("randm",)), progress=False)


def test_building_a_zoo_family_builds_each_missing_member_before_the_ranks_split(monkeypatch):
    """ppl-trend's model is a family, not an entry: under a launcher the ranks must find its
    members built (rank 0 builds them in `_build_models`), not train the same ones side by side."""
    from types import SimpleNamespace

    from neuronbench.harness.engine import zoo_family
    from neuronbench.harness.suite import task as task_module

    family = zoo_family.FAMILIES["ptb-grid-tiny"]
    done = {family.members[0]}
    built = []
    monkeypatch.setattr(task_module.catalogue, "status", lambda name: SimpleNamespace(built=name in done))
    monkeypatch.setattr(task_module, "build", lambda name, progress=True: built.append(name))
    RunEnv(progress=False).build("ptb-grid-tiny")
    assert built == [*family.members[1:], *family.planted]


def test_references_are_computed_once_stored_on_the_public_split_and_never_for_the_hidden(tmp_path):
    import numpy as np

    calls: list[int] = []

    def compute():
        calls.append(1)
        return {"scores": np.arange(6.0).reshape(2, 3)}

    parts, cache = {"kind": "test-reference", "spec": "abc", "seed": 0}, Cache(tmp_path / "cache")
    first = RunEnv(cache=cache)
    got = [first.reference(parts, compute), first.reference(parts, compute)]  # once per run
    later = RunEnv(cache=cache).reference(parts, compute)  # a later run reads the stored arrays
    assert len(calls) == 1
    for value in (*got, later):
        np.testing.assert_array_equal(value["scores"], np.arange(6.0).reshape(2, 3))
    RunEnv(cache=cache).reference({**parts, "seed": 1}, compute)  # other parts: computed again
    RunEnv(cache=None).reference(parts, compute)  # no cache: computed every run
    hidden = RunEnv(cache=cache, split="hidden", hidden_seed=5)
    hidden.reference(parts, compute)
    assert len(calls) == 4
    assert sorted(e.meta["parts"]["seed"] for e in cache.entries()) == [0, 1]  # nothing from the hidden split
