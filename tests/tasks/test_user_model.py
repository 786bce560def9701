"""A user's own models and data through `neuronbench run`: a fine-tuned classifier folder with a
labelled file and a word/TAG file (prune, probe, erasure: the README recipe), and a causal LM with
plain text (prune scores next-token log-likelihood, erasure the predicted next token)."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from neuronbench.harness.cli import main
from neuronbench.harness.zoo.tiny import tiny_model

WORDS = {"good": ("wonderful", "superb", "happily", "sharply"), "bad": ("boring", "dull", "badly", "written")}
FILLER = ("the", "cat", "sat", "on", "mat", "a", "dog", "was", "running", "in", "park", "movie", "plot")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    from neuronbench.harness.engine import paths

    monkeypatch.setattr(paths, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def sentences(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = ("pos", "neg")[i % 2]
        words = list(rng.choice(FILLER, 6)) + list(rng.choice(WORDS["good" if label == "pos" else "bad"], 2))
        texts.append(" ".join(rng.permutation(words)))
        labels.append(label)
    return texts, labels


def fine_tune(model, texts, labels=None, steps: int = 30) -> None:
    """A few full-batch AdamW steps: enough for a head that was trained, not one left at its init
    (sentence labels for a classifier; next tokens for a causal LM)."""
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    if labels is None:
        y = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    else:
        y = torch.tensor([int(x == "pos") for x in labels])
    opt = torch.optim.AdamW(model.model.parameters(), lr=3e-3)
    model.model.train()
    for _ in range(steps):
        opt.zero_grad()
        model.model(**enc, labels=y).loss.backward()
        opt.step()
    model.model.eval()


@pytest.fixture(scope="module")
def user_classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    texts, labels = sentences(120)
    base = tiny_model("bert", "classifier")
    base.model.save_pretrained(root / "pretrained")
    base.tokenizer.save_pretrained(root / "pretrained")
    fine_tune(base, texts, labels)
    base.model.save_pretrained(root / "my-classifier")
    base.tokenizer.save_pretrained(root / "my-classifier")
    pl.DataFrame({"text": texts, "label": labels}).write_csv(root / "reviews.csv")
    tags = {**{w: "JJ" for w in WORDS["good"] + WORDS["bad"]}, "the": "DT", "a": "DT", "on": "IN", "in": "IN",
            "was": "VBD", "running": "VBG", "sat": "VBD"}
    lines = [" ".join(f"{w}/{tags.get(w, 'NN')}" for w in t.split()) for t in texts[:80]]
    (root / "tags.txt").write_text("\n".join(lines) + "\n")
    return root


def _results(out):
    return pl.read_parquet(out / "results.parquet"), json.loads((out / "config.json").read_text())


def test_a_users_fine_tuned_classifier_and_files_through_prune_probe_erasure(tmp_path, user_classifier):
    root, out = user_classifier, tmp_path / "mine"
    model, data = str(root / "my-classifier"), [str(root / "reviews.csv"), str(root / "tags.txt")]
    assert main(["run", "--quick", "--tasks", "prune", "probe", "erasure", "--model", model, "--data", *data,
                 "--methods", "random", "gradxact", "weight-distance", "--out", str(out), "--no-report"]) == 0
    frame, config = _results(out)
    assert set(frame["model"]) == {model}
    assert config["tasks"]["prune"]["data"] == data[0] and config["tasks"]["erasure"]["data"] == data[0]
    assert config["tasks"]["probe"]["data"] == data[1]
    assert all(config["tasks"][t]["data_fingerprint"] for t in ("prune", "probe", "erasure"))
    ok = frame.filter(pl.col("status") == "ok")
    # random and gradxact; probe reads the encoder without its head, where gradxact has no objective.
    for task, head, n in (("prune", "prune.gap_auc", 2), ("probe", "probe.tmb_gap@10", 1),
                          ("erasure", "erasure.comp_gap_mean", 2)):
        assert ok.filter((pl.col("task") == task) & (pl.col("metric") == head)).height == n, task
    full = ok.filter(pl.col("metric") == "prune.full_accuracy")["value"][0]
    assert full > 0.6  # the fine-tuned head, scored on the user's own test split
    # No parent given and none recorded for a folder: weight-distance (stages) is not applicable to prune.
    wd = frame.filter((pl.col("task") == "prune") & (pl.col("method") == "weight-distance"))
    assert wd["status"].to_list() == ["not_applicable"]
    # The data's fingerprint moves the records' config hash.
    assert frame.filter(pl.col("task") == "prune")["config_hash"][0] == config["fingerprints"]["prune"]


def test_parent_gives_stage_methods_the_earlier_model(tmp_path, user_classifier):
    root, out = user_classifier, tmp_path / "staged"
    assert main(["run", "--quick", "--tasks", "prune", "--model", str(root / "my-classifier"),
                 "--parent", str(root / "pretrained"), "--data", str(root / "reviews.csv"),
                 "--methods", "weight-distance", "--out", str(out), "--no-report"]) == 0
    frame, config = _results(out)
    assert config["tasks"]["prune"]["parent"] == str(root / "pretrained")
    head = frame.filter(pl.col("metric") == "prune.gap_auc")
    assert head["status"].to_list() == ["ok"]


def test_a_causal_lm_with_plain_text_through_prune_and_erasure(tmp_path):
    folder, text = tmp_path / "my-lm", tmp_path / "corpus.txt"
    lm, texts = tiny_model("llama", "causal-lm"), sentences(120, seed=1)[0]
    fine_tune(lm, texts)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    text.write_text("\n".join(texts) + "\n")
    out = tmp_path / "lm"
    assert main(["run", "--quick", "--tasks", "prune", "erasure", "--model", str(folder), "--data", str(text),
                 "--methods", "random", "gradxact", "--out", str(out), "--no-report"]) == 0
    frame, config = _results(out)
    ok = frame.filter(pl.col("status") == "ok")
    acc = ok.filter(pl.col("metric") == "prune.full_accuracy")["value"][0]
    loglik = ok.filter(pl.col("metric") == "prune.full_loglik")["value"][0]
    assert 0 <= acc <= 1 and loglik < 0  # next-token accuracy and log-likelihood of held-out text
    assert ok.filter(pl.col("metric") == "prune.loglik_gap_auc").height == 2
    assert ok.filter(pl.col("metric") == "erasure.comp_gap_mean").height == 2
    assert ok.filter(pl.col("metric") == "erasure.full_accuracy").height == 0  # a next token has no gold label
    assert "causal-lm" in dict(config["tasks"]["prune"]["takes"]["adapted"])
