"""Tests for neuronbench.harness.engine.distributed: two CPU processes over gloo (launched the way torchrun
does, through its environment variables) collect statistics, run a pruning sweep and a `--quick`
suite slice (its items split across ranks, and each item's data split across ranks), and must get
what one process gets.

Tolerances: top-k, min/max, counts, the dense word matrices and the mask scores are compared
exactly; float64 means, M2, label sums and max-1 sums to rtol 1e-12 (the ranks' partial sums are
added in another order); the suite's records exactly but for values and intervals, to 1e-6
(relative or absolute; see `_assert_same_records`).
"""
from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from neuronbench.harness.engine import distributed
from neuronbench.harness.engine.activations import collect_cached
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine.intervene import MaskSet, evaluate_masks, gold_label_scores
from neuronbench.harness.suite.runner import RunConfig, run_suite
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import tiny_model, tiny_tokenizer
from neuronbench.tasks import prune
from conftest import LABELS, SENTENCES, quick_zoo_home

WORLD = 2
SLICE = RunConfig(tasks=("prune",), methods=("activation", "random", "weight-distance"), quick=True)
CFG = CollectConfig(sites=(Site.ffn(0), Site.ffn(1), Site.resid(1)), stats=("moments", "max1", "topk", "labels"),
                    max_tokens=96, topk=5)
DENSE = CollectConfig(sites=(Site.ffn(1),), stats=(), dense_words=True, max_tokens=96)


@pytest.fixture(scope="module")
def quick_home(tmp_path_factory):
    """The quick zoo model of the suite slice, built once, in a fresh home."""
    with quick_zoo_home(tmp_path_factory, "distributed-home", prune.SPEC.quick_version().model) as home:
        yield home


def _inputs():
    """A tiny BERT, a tiny BERT classifier and 60 labelled sentences of varied length (several batches)."""
    # Unique texts: equal top-k values (a repeated sentence) may be kept in either order.
    texts = [f"{i} " + " ".join((SENTENCES[i % 10] + " " + SENTENCES[(3 * i) % 10]).split()[: 3 + i % 13])
             for i in range(60)]
    sentences = datasets.Dataset.from_dict({"text": texts, "label": [LABELS[i % 10] for i in range(60)]})
    words = datasets.Dataset.from_dict({"words": [t.split() for t in texts]})
    tok = tiny_tokenizer(texts, vocab_size=120)  # the numbers are in its vocabulary, not [UNK]
    return tiny_model("bert", tokenizer=tok), tiny_model("bert", "classifier", seed=1, tokenizer=tok), sentences, words


def _masks(model) -> MaskSet:
    gen = torch.Generator().manual_seed(0)
    sets = [{Site.ffn(l): torch.randperm(64, generator=gen)[:n] for l in (0, 1)} for n in (0, 4, 16, 32, 48)]
    return MaskSet.from_sets(model, sets)


def _state(col) -> dict:
    out = {"n_tokens": col.n_tokens, "n_examples": col.n_examples}
    for site, st in col.sites.items():
        for name in ("moments", "max1", "topk", "labels"):
            stat = getattr(st, name)
            if stat is not None:
                out.update({f"{site}/{name}/{k}": v.cpu().clone() for k, v in stat.state().items()})
    return out


def _run_all(cache_root: Path, ranks: distributed.Ranks | None = None) -> dict:
    """Everything the test compares, as one process or one rank computes it: collection and the
    mask sweep split across the ranks, the suite slice's items split across them."""
    base, clf, test, words = _inputs()
    labels = torch.tensor(test["label"])
    cache = Cache(cache_root)
    with distributed.collective(ranks):
        col, _ = collect_cached(base, test, CFG, label_names=("neg", "pos"), cache=cache, progress=False)
        dense, _ = collect_cached(base, words, DENSE, cache=cache, progress=False)
        scores = evaluate_masks(clf, test, _masks(clf), lambda out, b: gold_label_scores(out, b, labels))
    return {"collect": _state(col), "meta": col.meta, "dense": np.array(dense.dense_words[Site.ffn(1)]),
            "scores": scores}


def _suite(parallel: str = "items") -> list[dict]:
    frame, _ = run_suite(dataclasses.replace(SLICE, parallel=parallel), progress=False)
    return frame.drop("run_id").to_dicts()


def _fail_on_one(item: int) -> int:
    if item == 1:
        raise ValueError("boom")
    return item


IDLE = [True, False, True, False, False]


def _rank_running() -> int:
    return distributed.current().rank


def _worker(rank: int, port: int, tmp: str, home: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), NEURONBENCH_HOME=home)
    torch.set_num_threads(1)
    ranks = distributed.init()
    try:
        out = _run_all(Path(tmp) / "cache", ranks)
        out["suite_data"] = _suite("data")  # first: its collections miss the cache, so they are split
        out["suite"] = _suite("items")
        out["ran_on"] = distributed.map_items(range(len(IDLE)), lambda i: _rank_running(), label=str, idle=IDLE)
        try:
            distributed.map_items([0, 1, 2], _fail_on_one, label=lambda i: f"item {i}")
        except distributed.RankFailure as err:
            out["failure"] = str(err)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        distributed.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _home_sharing(quick_home: Path, tmp_path: Path) -> Path:
    """A home with the quick home's corpora and zoo but its own empty activation cache."""
    home = tmp_path / "home"
    home.mkdir()
    for part in ("data", "zoo"):
        (home / part).symlink_to(quick_home / part, target_is_directory=True)
    return home


def _assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Same records in the same order; values and intervals to 1e-6 (relative or absolute: they are
    accuracies, log-likelihoods and their differences, of order 1 or less). `prune` evaluates the
    neuron sets methods share once per process, so a rank running other methods than one process
    evaluates them in other batch groupings, which moves float32 logits in the 7th-8th digit."""
    assert len(got) == len(want)
    floats = ("value", "ci_low", "ci_high")
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in floats} == {k: v for k, v in w.items() if k not in floats}
        for key in floats:
            assert (g[key] is None) == (w[key] is None), (g, key)
            if w[key] is not None:
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-6), (g, key)


def test_two_gloo_ranks_equal_one_process(quick_home, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the same kernels, so the same floats
    try:
        ref = _run_all(tmp_path / "ref-cache")
        ref["suite"] = _suite()
    finally:
        torch.set_num_threads(threads)
    home = _home_sharing(quick_home, tmp_path)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), str(home)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for got in ranks:
        assert got["collect"].keys() == ref["collect"].keys()
        for key, want in ref["collect"].items():
            if key.endswith(("mean", "m2", "sums", "act_sum")):
                torch.testing.assert_close(got["collect"][key], want, rtol=1e-12, atol=1e-12, msg=key)
            else:
                assert torch.equal(torch.as_tensor(got["collect"][key]), torch.as_tensor(want)), key
        np.testing.assert_array_equal(got["dense"], ref["dense"])
        assert torch.equal(got["scores"], ref["scores"])
        _assert_same_records(got["suite"], ref["suite"])
        _assert_same_records(got["suite_data"], ref["suite"])
        assert got["failure"] == "rank 1 failed on item 1: ValueError: boom"
        assert got["ran_on"] == distributed.owners(len(IDLE), distributed.Ranks(0, WORLD), "items", IDLE) == [1, 0, 0, 1, 0]
    for key in ref["collect"]:  # every rank holds the same bits
        assert torch.equal(torch.as_tensor(ranks[0]["collect"][key]), torch.as_tensor(ranks[1]["collect"][key])), key
    shares = ranks[0]["meta"]["distributed"]
    assert shares["world_size"] == WORLD and [s["rank"] for s in shares["ranks"]] == [0, 1]
    assert sum(s["examples"] for s in shares["ranks"]) == ref["collect"]["n_examples"]
    assert sum(s["tokens"] for s in shares["ranks"]) == ref["collect"]["n_tokens"]
    assert all(s["examples"] > 0 for s in shares["ranks"])
    entries = Cache(tmp_path / "cache").entries()  # rank 0 wrote each entry once, with its shares
    assert len(entries) == 2 and all(e.meta["collect_meta"]["distributed"]["world_size"] == WORLD for e in entries)


def test_cache_put_keeps_an_entry_another_writer_completed(tmp_path):
    cache = Cache(tmp_path)
    first = cache.put("k", lambda folder: (folder / "a.txt").write_text("one") and {"n": 1})
    second = cache.put("k", lambda folder: (folder / "a.txt").write_text("two") and {"n": 2})
    assert (first.path / "a.txt").read_text() == "one" and second.meta["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_owners_take_turns_on_the_working_items_before_the_idle_ones():
    """Idle items (not applicable, or finished in a resumed run) are no rank's turn: with the old
    plain turns, a run whose every other item was idle would put all the work on one rank."""
    two, three = distributed.Ranks(0, 2), distributed.Ranks(1, 3)
    idle = [i % 2 == 1 for i in range(8)]
    assert distributed.owners(8, two, "items") == [0, 1] * 4
    assert distributed.owners(8, two, "items", idle) == [0, 0, 1, 1, 0, 0, 1, 1]
    assert distributed.owners(8, three, "items", [False] * 8) == [0, 1, 2, 0, 1, 2, 0, 1]
    assert distributed.owners(8, two, "data", idle) == [None] * 8
    assert distributed.owners(3, None, "items", [True] * 3) == [None] * 3


def test_map_items_in_a_plain_process_runs_everything_in_order():
    assert distributed.current() is None
    assert distributed.map_items([3, 1, 2], lambda x: x * 10, label=str) == [30, 10, 20]
    with pytest.raises(ValueError, match="parallel"):
        distributed.map_items([1], str, label=str, parallel="nodes")
