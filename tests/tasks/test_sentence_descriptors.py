"""Tests for `sentence-descriptors` and its parts: generation cache and normalisation, clustering,
Cohen's d, the NeuronEval description metrics and their label sanity tests, the `evaluate`
modules, and end-to-end runs on a tiny BERT over a generated corpus with the keyword generator
stub: `contrast` and `discovery` find the planted units' descriptors, `random` does not."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from neuronbench.harness.engine import description
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.discovery import (StubProposer, assign, cluster, hash_embedder, normalise, propose,
                                           LMProposer, STUB_LEXICON)
from neuronbench.harness.engine.method import get_method
from neuronbench.harness.engine.metrics import precision_recall_at_k
from neuronbench.harness.suite.task import RunEnv
from neuronbench.harness.zoo.tiny import tiny_model, tiny_tokenizer
from neuronbench.harness.engine.hf_metrics import load as load_metric
from neuronbench.tasks import sentence_descriptors as S

TINY = "tiny-sentence-bert"
FILLER = ["the", "film", "is", "a", "movie", "this", "it", "was", "one", "of", "its", "with"]


# --------------------------------------------------------------------------- generation

def test_normalise_splits_cleans_and_dedups():
    assert normalise(" Comedy, comedy, romance and Drama!\nSentence: x") == ["comedy", "romance", "drama"]
    assert normalise(" a very long descriptor of four words, acting") == ["acting"]
    assert normalise(" topics: , ;") == []


class _Counting(StubProposer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def complete(self, texts):
        self.calls += len(texts)
        return super().complete(texts)


def test_propose_generates_each_text_once_and_caches_on_disk(tmp_path):
    prop = _Counting()
    texts = ["a funny movie", "the acting is bad", "a funny movie"]
    first, cost = propose(prop, texts, batch_size=2, cache_root=tmp_path)
    assert prop.calls == 2 and cost["generated"] == 2 and first[0] == first[2] == " comedy"
    again, cost = propose(_Counting(), texts, cache_root=tmp_path)
    assert again == first and cost == {"generated": 0, "cached": 2, "seconds": cost["seconds"], "seconds_per_text": None}


def test_lm_proposer_batches_greedy_completions(tiny):
    lm = tiny("llama", "causal-lm")
    prop = LMProposer(lm, max_new_tokens=3)
    out = prop.complete(["the cat sat", "a dog"])
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert lm.tokenizer.padding_side == "right"  # restored after left-padded generation
    assert prop.key == LMProposer(lm, max_new_tokens=3).key != LMProposer(lm, max_new_tokens=4).key


def test_cluster_merges_similar_terms_and_drops_rare_ones():
    embed = hash_embedder()
    terms = [["comedy"], ["comedy", "acting"], ["comedy"], ["acting"], ["acting"], ["horror"]]
    vocab = cluster(terms, embed, threshold=0.99, min_support=2)
    assert vocab.names == ("acting", "comedy") and vocab.support == (3, 3)
    assert assign([["comedy", "horror"], ["acting"]], vocab.names, vocab.centres, embed, 0.99) == [["comedy"], ["acting"]]
    merged = cluster([["comedy"], ["comedy"], ["comedys"]], embed, threshold=0.5, min_support=1)
    assert merged.names == ("comedy",) and merged.members == (("comedy", "comedys"),)


# --------------------------------------------------------------------------- truth statistic

def test_cohen_d_matches_the_formula_and_handles_degenerate_groups():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(50, 3))
    present = rng.random((50, 2)) < 0.4
    d = S.cohen_d(acts, present)
    for v in range(2):
        for n in range(3):
            a1, a0 = acts[present[:, v], n], acts[~present[:, v], n]
            pooled = np.sqrt(((len(a1) - 1) * a1.var(ddof=1) + (len(a0) - 1) * a0.var(ddof=1)) / (len(acts) - 2))
            assert d[v, n] == pytest.approx((a1.mean() - a0.mean()) / pooled)
    indicator = present[:, [0]].astype(float)
    assert S.cohen_d(indicator, present[:, [0]])[0, 0] == np.inf
    assert S.cohen_d(acts[:, :1], np.zeros((50, 1), bool))[0, 0] == 0.0


# --------------------------------------------------------------------------- description metrics

def test_sound_metrics_pass_the_label_tests_and_controls_fail_one_each():
    rng = np.random.default_rng(1)
    present = rng.random((400, 8)) < 0.25
    acts = present + rng.normal(scale=0.3, size=present.shape)  # neurons that follow their labels
    for name, fn in description.METRICS.items():
        rates = description.sanity_pass_rates(acts, present, fn, seed=0)
        if name == "precision":
            assert rates["missing"] > 0.9 and rates["extra"] < 0.1, rates
        elif name == "recall":
            assert rates["extra"] > 0.9 and rates["missing"] < 0.6, rates
        else:
            assert min(rates.values()) > 0.9, (name, rates)


def test_metric_values_on_hand_made_cases():
    acts = np.array([0.9, 0.8, 0.1, 0.0, 0.2])
    y = np.array([1, 0, 1, 0, 0], bool)
    assert description.auprc(acts, y) == pytest.approx((1 + 2 / 4) / 2)  # positives ranked 1st and 4th
    # active = top 40 % = inputs 0 and 1
    assert description.f1(acts, y, 0.4) == pytest.approx(0.5)
    assert description.iou(acts, y, 0.4) == pytest.approx(1 / 3)
    assert description.correlation(np.ones(5), y) == 0.0


def test_evaluate_modules_are_engine_package_data_and_load_by_folder():
    """The modules live under harness/engine (the fixed top level) and ship as package data: each
    folder holds its script, and `evaluate.load(folder)` loads it (no hub)."""
    import tomllib
    from pathlib import Path

    import evaluate

    from neuronbench.harness.engine import hf_metrics

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert data["neuronbench.harness.engine.hf_metrics"] == ["*/*.py"]
    for name in hf_metrics.MODULES:
        folder = Path(hf_metrics.module_dir(name))
        assert folder.parent == root / "harness" / "engine" / "hf_metrics" and (folder / f"{name}.py").is_file()
        assert evaluate.load(str(folder)).name == name
    assert not (root / "hf_metrics").exists()
    with pytest.raises(KeyError, match="NeuronBench ships"):
        hf_metrics.module_dir("accuracy")


def test_evaluate_modules_load_from_local_paths_and_agree_with_the_harness():
    pk = load_metric("neuron_precision_at_k")
    res = pk.compute(predictions=[["a", "b", "c"], ["x"], ["q"]], references=[["b", "z"], ["x"], []], k=2)
    want = [precision_recall_at_k(["a", "b", "c"], {"b", "z"}, 2), precision_recall_at_k(["x"], {"x"}, 2)]
    assert res["per_item_precision"] == [w[0] for w in want] and res["n_items"] == 2
    assert res["recall@k"] == pytest.approx(np.mean([w[1] for w in want]))
    rng = np.random.default_rng(0)
    acts, y = rng.normal(size=(3, 40)), rng.random((3, 40)) < 0.3
    desc = load_metric("neuron_description").compute(predictions=list(acts.astype(np.float32)),
                                                      references=list(y.astype(np.int8)), metrics=["auprc", "iou"])
    assert desc["per_item_auprc"] == pytest.approx([description.auprc(a, b) for a, b in zip(acts, y)], abs=1e-6)
    assert set(desc) == {"n_items", "auprc", "per_item_auprc", "iou", "per_item_iou"}
    with pytest.raises(ValueError, match="unknown description metrics"):
        load_metric("neuron_description").compute(predictions=[[0.0]], references=[[1]], metrics=["accuracy"])


# --------------------------------------------------------------------------- end to end on a toy corpus

@pytest.fixture(scope="module")
def toy_corpus(tmp_path_factory):
    """Sentences of filler words plus the cue words of 0-2 stub topics (so the stub proposes them)."""
    rng = np.random.default_rng(0)
    topics = list(STUB_LEXICON)
    rows = []
    for i in range(900):
        words = list(rng.choice(FILLER, 6))
        for t in rng.choice(topics, rng.integers(1, 3), replace=False):
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(STUB_LEXICON[t])))
        rows.append(f"{i % 2},{' '.join(words)}")
    path = tmp_path_factory.mktemp("sentences") / "toy.csv"
    path.write_text("label,text\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def toy_runs(toy_corpus, tmp_path_factory):
    words = FILLER + [w for cues in STUB_LEXICON.values() for w in cues]
    model = tiny_model("bert", "base", seed=0, tokenizer=tiny_tokenizer([" ".join(words)], vocab_size=len(words) + 120),
                       hidden=64, ffn=64)
    params = {**dict(S.SPEC.params), "generator": "stub", "embedder": "hash", "per_part": 300, "n_planted": 8,
              "bootstrap": 200}
    spec = dataclasses.replace(S.SPEC, model=TINY, data=str(toy_corpus), params=tuple(params.items()), quick=())
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEURONBENCH_HOME", str(home))
        env = RunEnv(seed=0, cache=Cache(home / "cache"), progress=False, _models={TINY: model})
        methods = {"contrast": get_method("contrast"), "random": get_method("random"),
                   "discovery": get_method("discovery", embedder="hash")}
        yield {name: {r.metric: r for r in S.score(spec, m, env)} for name, m in methods.items()}


def test_toy_vocabulary_is_the_stub_topics(toy_runs):
    rec = toy_runs["contrast"]
    assert rec[f"{S.NAME}.discovered_size"].value == len(STUB_LEXICON)
    assert rec[f"{S.NAME}.vocabulary_size"].value == len(STUB_LEXICON)


def test_methods_find_planted_descriptors_and_random_does_not(toy_runs):
    head = S.SPEC.headline
    for name in ("contrast", "discovery"):
        assert toy_runs[name][head].ci_low > 0, (name, toy_runs[name][head])
    r = toy_runs["random"][head]
    assert r.ci_low <= 0 <= r.ci_high
    assert toy_runs["contrast"][f"{S.NAME}.planted.fidelity"].value >= 0.75


def test_sanity_records_are_present_for_every_metric(toy_runs):
    rec = toy_runs["discovery"]
    for metric in description.METRICS:
        assert {f"{S.NAME}.metric_sanity.{metric}.{t}" for t in ("missing", "extra", "passed")} <= set(rec)
        assert f"{S.NAME}.planted.desc_{metric}@1" in rec
    assert rec[f"{S.NAME}.metric_sanity.precision.passed"].value == 0.0


def test_discovery_is_not_applicable_without_a_generator(tiny):
    import datasets

    from neuronbench.harness.engine.method import MethodContext

    model = tiny("bert")
    ctx = MethodContext(model, model.sites("resid"), datasets.Dataset.from_dict({"words": [["a", "cat"]]}), "d")
    with pytest.raises(NotImplementedError, match="no generator"):
        get_method("discovery").descriptors(ctx, ("comedy",))


def test_params_are_checked():
    assert S.Params.of(S.SPEC).ks == (1, 2, 5)
    for field, value in (("ks", (0, 2)), ("description_metrics", ("accuracy",)), ("n_planted", 0),
                         ("cluster_similarity", 1.5), ("truth_statistic", "auroc")):
        with pytest.raises(ValueError, match=field):
            S.Params(**{**dict(S.SPEC.params), field: value})
    with pytest.raises(ValueError, match="unknown parameter"):
        S.Params.of(dataclasses.replace(S.SPEC, params=(*S.SPEC.params, ("extra", 1))))
