"""Tests for the `erasure` task: the masks and the batched masked forward against plain hooks, an
oracle attribution that must beat random orders, reproducibility, the public/hidden split, bad
answers (tiny models), and one measurement of gradxact against random on the real model."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from torch import nn

from neuronbench.harness.engine import data
from neuronbench.harness.engine.batching import encode
from neuronbench.harness.engine.method import Method, MethodContext, MethodOutputError, get_method
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.suite.runner import run_one
from neuronbench.harness.suite.task import TASKS, RunEnv
from neuronbench.harness.zoo.tiny import tiny_model, tiny_tokenizer
from neuronbench.tasks import erasure
from neuronbench.tasks.prune import train_means

TINY = "tiny-erasure-classifier"
LAYERS = (0, 1)  # of 3 blocks: the last block's output reaches the head through [CLS] only
SPEC = dataclasses.replace(
    erasure.SPEC.quick_version(), model=TINY,
    params=tuple({**dict(erasure.SPEC.quick_version().params), "layers": LAYERS}.items()))


@pytest.fixture(scope="module")
def corpus():
    return data.load("polarity", SPEC.split_seed)


@pytest.fixture(scope="module")
def model(corpus):
    """A random 3-block tiny BERT classifier with unit-gain weights and a word-level tokenizer, so
    that its prediction moves when hidden states of single positions are replaced."""
    loaded = tiny_model("bert", "classifier", seed=5, layers=3,
                        tokenizer=tiny_tokenizer(list(corpus.splits["train"]["text"][:500]), vocab_size=400))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in loaded.model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features ** 0.5)
    return loaded


@pytest.fixture(scope="module")
def means(model, corpus, tmp_path_factory):
    from neuronbench.harness.engine.cache import Cache

    sites = tuple(Site.resid(layer) for layer in LAYERS)
    return train_means(model, corpus.splits["train"], "erasure-test-train", sites,
                       Cache(tmp_path_factory.mktemp("cache")))


def _run(model, method: Method, seed: int = 0, cache=None, split: str = "public", **params):
    spec = dataclasses.replace(SPEC, params=tuple({**dict(SPEC.params), **params}.items()))
    env = RunEnv(seed=seed, cache=cache, progress=False, split=split,
                 hidden_seed=11 if split == "hidden" else None, _models={TINY: model})
    return run_one(TASKS.get("erasure"), spec, method, env)


def _by_metric(records) -> dict[tuple[str, float | None], float]:
    return {(r.metric, r.k): r.value for r in records}


class LeaveOneOut(Method):
    """Oracle: each position's score is the drop in p(predicted class) when its hidden state alone is
    replaced by the train mean (a reference computed in the test, not a baseline)."""

    name = "leave-one-out"

    def __init__(self, means):
        self.means = means

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        enc = encode(ctx.model.tokenizer, ctx.data, ctx.model.max_length)
        T = max(len(x) for x in enc.input_ids)
        singles = [np.eye(T, len(x), dtype=bool) for x in enc.input_ids]  # row t masks position t
        full = erasure.masked_probs(ctx.model, enc, None, [np.zeros((1, len(x)), bool) for x in enc.input_ids],
                                    None)[0]
        probs = erasure.masked_probs(ctx.model, enc, layer, singles, self.means[Site.resid(layer)])
        pred = full.argmax(1)
        drop = full[np.arange(len(pred)), pred] - probs[:, np.arange(len(pred)), pred]  # (T, n)
        return [torch.from_numpy(drop[: len(x), i].copy()) for i, x in enumerate(enc.input_ids)]


class Recorder(Method):
    """Random scores; remembers the example ids and context of every call."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        self.calls.append((layer, tuple(ctx.data["id"]), ctx.data_id, ctx.seed, ctx.sites))
        return get_method("random").attribute_positions(ctx, layer)


class OffByOne(Method):
    name = "off-by-one"

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        return [s[1:] for s in get_method("random").attribute_positions(ctx, layer)]


class RelevanceOnly(Method):
    name = "relevance-only"

    def relevance(self, ctx):
        raise AssertionError("not asked")


# ---------------------------------------------------------------- masks and the masked forward

def test_top_q_sizes_round_and_keep_at_least_one():
    assert [erasure.n_top(q, 10) for q in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)] == [0, 1, 1, 2, 5, 10]
    assert erasure.n_top(0.05, 3) == 1 and erasure.n_top(0.5, 0) == 0
    with pytest.raises(ValueError, match="q=1.5"):
        erasure.n_top(1.5, 10)


def test_masks_remove_the_top_or_keep_only_the_top_of_the_candidates():
    candidates = np.arange(1, 9)  # 10 tokens: [CLS] 8 words [SEP]
    order = erasure.position_order(np.array([0, 5, 1, 9, 2, 8, 3, 7, 4, 99.0]), candidates,
                                   np.random.default_rng(0))
    assert order.tolist() == [3, 5, 7, 1, 8, 6, 4, 2]  # [SEP]'s score never counts
    masks = erasure.erasure_masks(order, 10, (0.0, 0.25, 1.0))
    assert not masks[0].any() and np.flatnonzero(masks[1]).tolist() == [3, 5]
    assert np.flatnonzero(masks[2]).tolist() == candidates.tolist()
    assert np.array_equal(masks[3], masks[2]) and not masks[5].any()  # keep none = remove all
    assert np.flatnonzero(masks[4]).tolist() == [1, 2, 4, 6, 7, 8]


def test_ties_are_broken_at_random_not_by_position():
    firsts = {erasure.position_order(np.zeros(12), np.arange(1, 11), np.random.default_rng(s))[0]
              for s in range(20)}
    assert len(firsts) > 3


def _plain_probs(model, text: str, block=None, replace=None) -> np.ndarray:
    """Softmax of one unpadded example, optionally with `block`'s output replaced by a plain hook."""
    enc = model.tokenizer(text, return_tensors="pt", truncation=True, max_length=model.max_length)
    handle = None
    if block is not None:
        handle = block.register_forward_hook(
            lambda m, a, out: (replace(out[0]), *out[1:]) if isinstance(out, tuple) else replace(out))
    try:
        with torch.no_grad():
            return torch.softmax(model.model(**enc).logits[0].double(), -1).numpy()
    finally:
        if handle is not None:
            handle.remove()


def test_masking_nothing_changes_nothing_and_masking_every_candidate_is_the_all_baseline_input(
        model, corpus, means, reference):
    examples = corpus.splits["test"].select(range(12))
    enc = encode(model.tokenizer, examples, model.max_length)
    layer, base = 1, means[Site.resid(1)]
    orders = [np.random.default_rng(i).permutation(np.flatnonzero(c)) for i, c in enumerate(enc.counted)]
    masks = [erasure.erasure_masks(o, len(x), (0.0, 1.0)) for o, x in zip(orders, enc.input_ids)]
    probs = erasure.masked_probs(model, enc, layer, masks, base, max_tokens=300)  # several batches
    for i, text in enumerate(examples["text"]):
        plain = _plain_probs(model, text)
        special = torch.tensor([not c for c in enc.counted[i]])

        def all_baseline(h):
            return torch.where(special[None, :, None], h, base.to(h.dtype))

        masked = _plain_probs(model, text, reference.block_of(model, layer), all_baseline)
        assert np.abs(plain - masked).max() > 1e-3  # the model reacts, so the test can fail
        np.testing.assert_allclose(probs[0, i], plain, atol=1e-5)  # remove the top 0%
        np.testing.assert_allclose(probs[3, i], plain, atol=1e-5)  # keep everything
        for row in (1, 2):  # remove every candidate; keep none
            np.testing.assert_allclose(probs[row, i], masked, atol=1e-5)


# ---------------------------------------------------------------- scores

def test_a_leave_one_out_oracle_beats_random_orders_on_comprehensiveness(model, means, tmp_cache):
    oracle = _run(model, LeaveOneOut(means), cache=tmp_cache)
    chance = _by_metric(_run(model, get_method("random"), cache=tmp_cache))
    got = _by_metric(oracle)
    for k in map(float, LAYERS):
        reference = got[("erasure.random_comprehensiveness", k)]
        assert reference == chance[("erasure.random_comprehensiveness", k)]  # the harness's, not the method's
        assert got[("erasure.comprehensiveness", k)] > reference
    (head,) = [r for r in oracle if r.metric == SPEC.headline]
    assert head.k is None and head.ci_low > 0 and head.value > chance[(SPEC.headline, None)] + 0.01
    for r in oracle:
        assert r.status == "ok" and r.ci_low <= r.value <= r.ci_high, r


def test_records_have_every_metric_and_are_deterministic_for_a_seed(model, tmp_cache):
    first = _run(model, get_method("random"), seed=1, cache=tmp_cache)
    assert first == _run(model, get_method("random"), seed=1, cache=tmp_cache)
    per_layer = ("comprehensiveness", "sufficiency", "random_comprehensiveness", "random_sufficiency",
                 "comp_gap", "suff_gap")
    expected = {(f"erasure.{m}", float(layer)) for m in per_layer for layer in LAYERS}
    expected |= {(f"erasure.{m}", None) for m in ("comp_gap_mean", "suff_gap_mean", "full_accuracy")}
    got = _by_metric(first)
    assert set(got) == expected and len(first) == len(expected)
    other = _by_metric(_run(model, get_method("random"), seed=2, cache=tmp_cache))
    key = ("erasure.random_comprehensiveness", 0.0)
    assert other[key] != got[key]  # another seed draws other random orders
    assert other[("erasure.full_accuracy", None)] == got[("erasure.full_accuracy", None)]


def test_the_hidden_split_scores_other_examples_from_the_same_method_outputs(model, tmp_cache, monkeypatch):
    scored = []
    build = erasure.Scoring.build
    monkeypatch.setattr(erasure.Scoring, "build", classmethod(
        lambda cls, m, examples: scored.append(tuple(examples["id"])) or build(m, examples)))
    public, hidden = Recorder(), Recorder()
    a = _run(model, public, cache=tmp_cache)
    b = _run(model, hidden, cache=tmp_cache, split="hidden")
    assert public.calls == hidden.calls and [c[0] for c in public.calls] == list(LAYERS)
    pool = public.calls[0][1]
    assert len(pool) == erasure.Params.of(SPEC).n_pool and all(c[1] == pool for c in public.calls)
    assert len(scored) == 2 and set(scored[0]) < set(pool) and set(scored[1]) < set(pool)
    assert not set(scored[0]) & set(scored[1]) and len(scored[0]) == erasure.Params.of(SPEC).n_test
    assert _by_metric(a) != _by_metric(b)


def test_bad_answers_and_parameters_are_rejected(model, tmp_cache):
    with pytest.raises(MethodOutputError, match="off-by-one.*scores for"):
        _run(model, OffByOne(), cache=tmp_cache)
    (only,) = _run(model, RelevanceOnly(), cache=tmp_cache)
    assert only.metric == "erasure.not_applicable" and only.status == "not_applicable" and only.value is None
    with pytest.raises(ValueError, match="n_pool"):
        _run(model, get_method("random"), n_pool=10)
    with pytest.raises(ValueError, match="outside the model"):
        _run(model, get_method("random"), layers=(0, 3))


# ---------------------------------------------------------------- the real model

@pytest.mark.realmodel
@pytest.mark.slow
def test_gradxact_and_random_on_smollm2_with_a_users_text_file(tmp_path, capsys):
    """CI's real-model smoke test of erasure: the packaged SmolLM2 (built from its GGUF file on
    first use, about 30 s) end to end through `neuronbench run --quick` on 240 polarity sentences
    as a plain text file, each text's predicted next token as the objective. random's gap must be
    indistinguishable from 0, both methods are compared with one random reference, and a next
    token has no gold label to give an accuracy; gradxact's gap is printed (measured, not asserted)."""
    import polars as pl

    from neuronbench.harness.cli import main

    text, out = tmp_path / "polarity.txt", tmp_path / "run"
    text.write_text("\n".join(data.load("polarity").splits["test"]["text"][:240]) + "\n")
    assert main(["run", "--quick", "--tasks", "erasure", "--model", "smollm2-135m", "--data", str(text),
                 "--methods", "random", "gradxact", "--out", str(out), "--no-report"]) == 0
    frame = pl.read_parquet(out / "results.parquet")
    assert set(frame["status"]) == {"ok"} and set(frame["model"]) == {"smollm2-135m"}
    head = {m: frame.filter((pl.col("metric") == erasure.SPEC.headline) & (pl.col("method") == m)).row(0, named=True)
            for m in ("random", "gradxact")}
    assert head["random"]["ci_low"] <= 0 <= head["random"]["ci_high"], head["random"]
    reference = frame.filter(pl.col("metric") == "erasure.random_comprehensiveness").sort("k")
    assert reference.height > 0
    assert reference.filter(pl.col("method") == "random")["value"].to_list() == \
        reference.filter(pl.col("method") == "gradxact")["value"].to_list()
    assert frame.filter(pl.col("metric") == "erasure.full_accuracy").height == 0
    with capsys.disabled():
        print("smollm2 erasure gradxact", {k: f"{head['gradxact'][k]:+.3f}" for k in ("value", "ci_low", "ci_high")})


@pytest.mark.realmodel
@pytest.mark.slow
def test_gradxact_and_random_on_minilm_polarity(tmp_cache):
    """One layer and fewer examples than the spec (the train-mean collection dominates): random's
    gap must be indistinguishable from 0; gradxact's is printed (measured, not asserted). Skipped
    unless the full `minilm-polarity` is built (the default suite builds it; a fine-tune of about
    10 minutes on 2 cores, which CI does not pay: the SmolLM2 test above is its real-model test)."""
    from neuronbench.harness.engine import catalogue

    if not catalogue.status("minilm-polarity").built:
        pytest.skip("minilm-polarity is not built (about 10 min): `neuronbench zoo build minilm-polarity`")
    spec = dataclasses.replace(erasure.SPEC, params=tuple({**dict(erasure.SPEC.params), "layers": (2,),
                                                            "n_pool": 80, "n_test": 40, "random_seeds": 2,
                                                            "bootstrap": 500}.items()))
    env = RunEnv(seed=0, cache=tmp_cache, progress=False)
    out = {}
    for name in ("random", "gradxact"):
        start = time.perf_counter()
        out[name] = {(r.metric, r.k): r for r in erasure.score(spec, get_method(name), env)}
        print(name, f"{time.perf_counter() - start:.1f}s", {f"{m}@{k}": f"{r.value:+.3f} [{r.ci_low:+.3f}, "
              f"{r.ci_high:+.3f}]" for (m, k), r in out[name].items() if "gap" in m})
    assert out["random"][("erasure.full_accuracy", None)].value > 0.7
    head = out["random"][(spec.headline, None)]
    assert head.ci_low <= 0 <= head.ci_high
    key = ("erasure.random_comprehensiveness", 2.0)
    assert out["random"][key].value == out["gradxact"][key].value  # one random reference per run


class ObjectiveSpy(Method):
    """Random scores; remembers the objective each call was asked to explain."""

    name = "objective-spy"

    def __init__(self):
        self.seen = []

    def attribute_positions(self, ctx: MethodContext, layer: int) -> list[torch.Tensor]:
        self.seen.append(ctx.objective)
        return get_method("random").attribute_positions(ctx, layer)


def test_the_task_declares_the_objective_it_scores(model, tmp_cache):
    """On a causal LM gradient methods are asked for log p(predicted next token), what erasure
    masks; a classifier keeps its default (the gold label)."""
    lm_name, spy = "tiny-erasure-lm", ObjectiveSpy()
    spec = dataclasses.replace(SPEC, model=lm_name)
    env = RunEnv(seed=0, cache=tmp_cache, progress=False, _models={lm_name: tiny_model("llama", "causal-lm")})
    run_one(TASKS.get("erasure"), spec, spy, env)
    assert spy.seen == ["predicted-next-token"] * len(LAYERS)
    records = run_one(TASKS.get("erasure"), spec, get_method("gradxact"), env)
    assert {r.status for r in records} == {"ok"} and _by_metric(records)[("erasure.comp_gap_mean", None)] is not None
    classifier_spy = ObjectiveSpy()
    _run(model, classifier_spy, cache=tmp_cache)
    assert classifier_spy.seen == [None] * len(LAYERS)


def _block_rows(model):
    """The batch rows each block's output leaves with, per block (hooks to remove after)."""
    from neuronbench.harness.engine.arch import layer_modules

    seen: dict[int, list[int]] = {}

    def make(i):
        def hook(module, args, output):
            seen.setdefault(i, []).append(int((output[0] if isinstance(output, tuple) else output).shape[0]))
        return hook
    return seen, [b.register_forward_hook(make(i)) for i, b in enumerate(layer_modules(model.model))]


@pytest.mark.parametrize("arch,kind", [("bert", "classifier"), ("llama", "causal-lm"), ("gpt2", "causal-lm"),
                                       ("gpt2", "classifier")])
def test_masked_variants_reuse_the_blocks_up_to_the_masked_layer_with_the_same_probabilities(
        tiny, corpus, arch, kind):
    model = tiny(arch, kind)
    enc = encode(model.tokenizer, corpus.splits["test"].select(range(6)), model.max_length)
    n, V = len(enc.input_ids), 4
    base = torch.full((model.width(Site.resid(0)),), 0.5)
    masks = [np.random.default_rng(i).random((V, len(x))) < 0.5 for i, x in enumerate(enc.input_ids)]
    plain = erasure.masked_probs(model, enc, 0, masks, base, prefix_once=False)
    seen, handles = _block_rows(model)
    try:
        reused = erasure.masked_probs(model, enc, 0, masks, base)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(reused, plain, rtol=0, atol=1e-5)
    assert np.abs(plain[0] - plain[1]).max() > 1e-4  # the variants differ, so the test can fail
    if (arch, kind) == ("gpt2", "classifier"):  # pools by input_ids: one try, then copied inputs
        assert seen[0] == [n, V * n]
    else:  # block 0 (the masked layer) once on the plain batch, every later block on the V copies
        assert seen[0] == [n] and seen[1] == [V * n]
