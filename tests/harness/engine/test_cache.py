"""Tests for neuronbench.harness.engine.cache and activations.collect_cached: hits, keys, and entries that a
killed or damaged write must never pass off as complete."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from neuronbench.harness.engine import paths
from neuronbench.harness.engine.activations import cache_parts, collect_cached
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.collect import CollectConfig, collect
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("isolated_home")

CFG = CollectConfig(sites=(Site.ffn(0), Site.resid(1)), topk=3)


def assert_same_stats(a, b):
    assert a.index == b.index and (a.n_tokens, a.n_examples) == (b.n_tokens, b.n_examples)
    for site in a.index.sites:
        for name in ("moments", "max1", "topk", "labels"):
            sa, sb = getattr(a[site], name), getattr(b[site], name)
            assert (sa is None) == (sb is None)
            if sa is not None:
                for key, value in sa.state().items():
                    np.testing.assert_array_equal(value.cpu().numpy(), sb.state()[key].cpu().numpy(),
                                                  err_msg=f"{site} {name} {key}")


def _visible(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".tmp-")) if root.exists() else []


# ---------------------------------------------------------------- hits and keys

def test_second_call_is_a_hit_with_equal_statistics(tiny, sentence_data, tmp_cache):
    model = tiny("bert")
    first, hit1 = collect_cached(model, sentence_data, CFG, cache=tmp_cache, progress=False)
    second, hit2 = collect_cached(model, sentence_data, CFG, cache=tmp_cache, progress=False)
    assert (hit1, hit2) == (False, True)
    assert_same_stats(first, second)
    assert_same_stats(second, collect(model, sentence_data, CFG, progress=False))
    assert len(tmp_cache.entries()) == 1


def test_default_cache_lives_under_neuronbench_home(tiny, sentence_data, isolated_home):
    _, hit = collect_cached(tiny("gpt2"), sentence_data, CFG, progress=False)
    assert not hit
    assert len(Cache(isolated_home / "cache").entries()) == 1
    assert Cache().root == isolated_home / "cache"


def _key(model, data, cfg, cache, **kw):
    return cache.key(cache_parts(model, data, cfg, **kw))


def test_key_changes_with_config_model_weights_and_data(tiny, sentence_data, tmp_cache):
    model = tiny("bert")
    base = _key(model, sentence_data, CFG, tmp_cache)
    assert base == _key(model, sentence_data, CFG, tmp_cache)  # stable
    other_seed = tiny_model("bert", seed=1)
    other_seed.name = model.name  # only the weights differ
    changed = {
        "sites": _key(model, sentence_data, replace(CFG, sites=(Site.ffn(0),)), tmp_cache),
        "stats": _key(model, sentence_data, replace(CFG, stats=("moments",)), tmp_cache),
        "topk": _key(model, sentence_data, replace(CFG, topk=4), tmp_cache),
        "alignment": _key(model, sentence_data, replace(CFG, alignment="first"), tmp_cache),
        "include_special": _key(model, sentence_data, replace(CFG, include_special=True), tmp_cache),
        "max_length": _key(model, sentence_data, replace(CFG, max_length=8), tmp_cache),
        "seed": _key(other_seed, sentence_data, CFG, tmp_cache),
        "text": _key(model, sentence_data.map(lambda r: {"text": r["text"] + " ."}), CFG, tmp_cache),
        "labels": _key(model, sentence_data.map(lambda r: {"label": 1 - r["label"]}), CFG, tmp_cache),
        "data_id": _key(model, sentence_data, CFG, tmp_cache, data_id="polarity/train"),
    }
    assert all(key != base for key in changed.values()), [n for n, k in changed.items() if k == base]
    assert len(set(changed.values())) == len(changed)


def test_batching_and_kernel_choice_do_not_change_the_key(tiny, sentence_data, tmp_cache):
    model = tiny("bert")
    collect_cached(model, sentence_data, CFG, cache=tmp_cache, progress=False)
    for other in (replace(CFG, max_tokens=16), replace(CFG, max_batch=2), replace(CFG, fused=False)):
        assert collect_cached(model, sentence_data, other, cache=tmp_cache, progress=False)[1]


def test_different_seed_or_data_is_a_miss(tiny, sentence_data, tmp_cache):
    model = tiny("llama")
    collect_cached(model, sentence_data, CFG, cache=tmp_cache, progress=False)
    other = tiny("llama", seed=1)
    assert not collect_cached(other, sentence_data, CFG, cache=tmp_cache, progress=False)[1]
    assert not collect_cached(model, sentence_data.select(range(5)), CFG, cache=tmp_cache, progress=False)[1]
    assert len(tmp_cache.entries()) == 3


def test_label_names_are_part_of_the_key(tiny, sentence_data, tmp_cache):
    """Label names set the number of label rows; a cached collection with other names is another result."""
    model = tiny("bert")
    three, _ = collect_cached(model, sentence_data, CFG, label_names=("neg", "pos", "neutral"),
                              cache=tmp_cache, progress=False)
    assert three[Site.ffn(0)].labels.sums.shape[0] == 3
    two, hit = collect_cached(model, sentence_data, CFG, label_names=("neg", "pos"), cache=tmp_cache,
                              progress=False)
    assert not hit
    assert two.label_names == ("neg", "pos") and two[Site.ffn(0)].labels.sums.shape[0] == 2


def test_dense_words_round_trip_through_the_cache(tiny, word_data, tmp_cache):
    cfg = CollectConfig(sites=(Site.ffn(1),), stats=("moments",), dense_words=True)
    first, _ = collect_cached(tiny("bert"), word_data, cfg, cache=tmp_cache, progress=False)
    second, hit = collect_cached(tiny("bert"), word_data, cfg, cache=tmp_cache, progress=False)
    assert hit
    np.testing.assert_array_equal(first.dense_words[Site.ffn(1)], second.dense_words[Site.ffn(1)])
    assert second.dense_words[Site.ffn(1)].shape == (sum(map(len, word_data["words"])), 64)


# ---------------------------------------------------------------- killed and damaged writes

def test_write_raising_midway_leaves_no_entry(tmp_cache):
    def write(folder):
        (folder / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        tmp_cache.put("k1", write)
    assert tmp_cache.get("k1") is None and tmp_cache.entries() == []
    assert _visible(tmp_cache.root) == []


def test_collect_raising_midway_leaves_no_entry_and_a_retry_builds_it(tiny, sentence_data, tmp_cache,
                                                                       monkeypatch):
    from neuronbench.harness.engine import activations

    original = activations.save_collection

    def broken(col, folder):  # the tensors are on disk, then the run is interrupted
        original(col, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(activations, "save_collection", broken)
    with pytest.raises(KeyboardInterrupt):
        collect_cached(tiny("bert"), sentence_data, CFG, cache=tmp_cache, progress=False)
    assert _visible(tmp_cache.root) == [] and tmp_cache.entries() == []
    monkeypatch.undo()
    _, hit = collect_cached(tiny("bert"), sentence_data, CFG, cache=tmp_cache, progress=False)
    assert not hit and len(tmp_cache.entries()) == 1


def test_process_killed_inside_a_write_leaves_only_a_tmp_folder(tmp_cache):
    """A hard kill (no exception handling runs) leaves a `.tmp-*` folder that never counts as an entry."""
    script = (
        "import os, sys; from pathlib import Path; from neuronbench.harness.engine.cache import Cache\n"
        "def write(folder):\n"
        "    (folder / 'stats.safetensors').write_bytes(b'x' * 1000)\n"
        "    os._exit(9)\n"
        "Cache(Path(sys.argv[1])).put('k1', write)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_cache.root)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert any(p.name.startswith(".tmp-k1") for p in tmp_cache.root.iterdir())
    assert _visible(tmp_cache.root) == []
    assert tmp_cache.get("k1") is None and tmp_cache.entries() == []
    entry, hit = tmp_cache.get_or_put({"x": 1}, lambda folder: {})
    assert not hit and tmp_cache.get(entry.key) is not None


@pytest.mark.parametrize("damage", ["truncate", "delete", "meta", "same-size", "header"])
def test_damaged_entry_is_detected_removed_and_rebuilt(tiny, sentence_data, tmp_cache, damage):
    model = tiny("gpt2")
    collect_cached(model, sentence_data, CFG, cache=tmp_cache, progress=False)
    (entry,) = tmp_cache.entries()
    target = entry.path / "stats.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "delete":
        target.unlink()
    elif damage == "same-size":  # other values, same size: only the content hash can tell
        data = bytearray(target.read_bytes())
        data[-64:] = bytes(b ^ 0x5A for b in data[-64:])
        target.write_bytes(bytes(data))
    elif damage == "header":
        data = bytearray(target.read_bytes())
        data[8:16] = b"{{{{{{{{"
        target.write_bytes(bytes(data))
    else:
        (entry.path / "meta.json").write_text("{ not json")
    assert tmp_cache.get(entry.key) is None
    assert not entry.path.exists()  # removed, not left to be trusted later
    rebuilt, hit = collect_cached(model, sentence_data, CFG, cache=tmp_cache, progress=False)
    assert not hit
    assert_same_stats(collect(model, sentence_data, CFG, progress=False), rebuilt)
    assert tmp_cache.get(entry.key) is not None


def test_entry_meta_lists_every_file_with_its_size(tiny, sentence_data, tmp_cache):
    collect_cached(tiny("bert"), sentence_data, CFG, cache=tmp_cache, progress=False)
    (entry,) = tmp_cache.entries()
    meta = json.loads((entry.path / "meta.json").read_text())
    files = sorted(p.name for p in entry.path.iterdir() if p.name not in ("meta.json", paths.MARKER))
    assert [f["name"] for f in meta["files"]] == files
    assert all(f["bytes"] == (entry.path / f["name"]).stat().st_size for f in meta["files"])
    assert meta["key"] == entry.key and meta["parts"]["config"]["sites"] == ["ffn.0", "resid.1"]


def test_clear_removes_entries_and_leftover_tmp_folders(tmp_cache):
    tmp_cache.get_or_put({"a": 1}, lambda folder: {})
    tmp_cache.get_or_put({"a": 2}, lambda folder: {})
    (tmp_cache.root / ".tmp-dead-123").mkdir()
    assert len(tmp_cache.entries()) == 2
    assert tmp_cache.clear() == 3
    assert tmp_cache.entries() == [] and list(tmp_cache.root.iterdir()) == []
    assert Cache(tmp_cache.root / "never-made").clear() == 0


def test_an_entry_whose_meta_is_not_an_object_is_not_listed_and_is_rebuilt(tmp_cache):
    entry, _ = tmp_cache.get_or_put({"a": 1}, lambda folder: {})
    (entry.path / "meta.json").write_text("[1, 2]")
    assert tmp_cache.entries() == []
    assert tmp_cache.get(entry.key) is None and not entry.path.exists()
