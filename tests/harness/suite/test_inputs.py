"""`run --model/--parent/--data` checked against what each task takes, before any work: every
refusal is one line on stderr, exit code 2, and nothing written."""
from __future__ import annotations

import json

import pytest
import transformers as tf

from neuronbench.harness.cli import main
from neuronbench.harness.zoo.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    from neuronbench.harness.engine import paths

    monkeypatch.setattr(paths, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def save(model, folder):
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {kind: save(tiny_model("llama" if kind == "causal-lm" else "bert", kind), root / kind)
           for kind in ("base", "causal-lm", "classifier")}
    # A classifier whose checkpoint holds only the encoder: transformers initialises its head on load.
    untrained = root / "untrained"
    save(tiny_model("bert", "base"), untrained)
    config = json.loads((untrained / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (untrained / "config.json").write_text(json.dumps(config))
    out["untrained"] = str(untrained)
    tok = tiny_tokenizer(cls_sep=False)
    moe = tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, pad_token_id=0))
    moe.save_pretrained(root / "moe")
    tok.save_pretrained(root / "moe")
    out["moe"] = str(root / "moe")
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "labelled.csv").write_text("text,label\n" + "".join(f"the cat sat {i},{i % 2}\n" for i in range(12)))
    (root / "other.csv").write_text("text,label\n" + "".join(f"a dog {i},{i % 2}\n" for i in range(12)))
    (root / "plain.txt").write_text("the cat sat on the mat\nstocks rallied\n")
    (root / "bad.csv").write_text("text,label\nfine,1\nno label here,\n")
    return {p.stem: str(p) for p in root.iterdir()}


def refused(capsys, tmp_path, argv) -> str:
    out = tmp_path / "out"
    assert main(["run", "--quick", "--methods", "random", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("neuronbench: error:"), err
    assert not out.exists()
    return err


@pytest.mark.parametrize("task,kind,message", [
    ("prune", "base", "scores a classifier or causal-lm model; '.*' is a base model"),
    ("erasure", "base", "scores a classifier or causal-lm model"),
    ("ppl-trend", "causal-lm", r"scores a trajectory model \(a zoo trajectory or family, or checkpoints in training order"),
    ("ppl-trend", "classifier", "scores a trajectory model"),
])
def test_a_model_of_a_kind_the_task_does_not_take_is_refused(capsys, tmp_path, folders, task, kind, message):
    import re

    err = refused(capsys, tmp_path, ["--tasks", task, "--model", folders[kind]])
    assert re.search(message, err), err


def test_a_classifier_whose_head_was_never_trained_is_refused(capsys, tmp_path, folders):
    err = refused(capsys, tmp_path, ["--tasks", "prune", "--model", folders["untrained"]])
    assert "classifier head" in err and "was never trained" in err and "classifier.weight" in err


def test_a_model_without_a_recognisable_mlp_is_refused(capsys, tmp_path, folders):
    err = refused(capsys, tmp_path, ["--tasks", "prune", "--model", folders["moe"]])
    assert "no recognisable MLP" in err and "looked for" in err


def test_a_task_whose_protocol_fixes_its_model_refuses_another(capsys, tmp_path, folders):
    err = refused(capsys, tmp_path, ["--tasks", "txray-prune", "--model", folders["classifier"]])
    assert "'txray-prune' takes neither another model nor your data" in err and "drop txray-prune" in err


def test_a_parent_that_cannot_load_is_refused(capsys, tmp_path, folders):
    err = refused(capsys, tmp_path, ["--tasks", "prune", "--model", folders["classifier"],
                                     "--parent", str(tmp_path / "no-such-folder")])
    assert "cannot load model" in err


def test_data_no_task_takes_is_refused(capsys, tmp_path, files):
    err = refused(capsys, tmp_path, ["--tasks", "ppl-trend", "--data", files["labelled"]])
    assert "is sentence data, which none of the tasks takes" in err and "ppl-trend takes none" in err


def test_plain_text_is_refused_for_a_classifier(capsys, tmp_path, folders, files):
    err = refused(capsys, tmp_path, ["--tasks", "prune", "--model", folders["classifier"], "--data", files["plain"]])
    assert "is lm data" in err and "prune takes sentence" in err


def test_two_files_one_task_takes_are_refused(capsys, tmp_path, folders, files):
    err = refused(capsys, tmp_path, ["--tasks", "prune", "--model", folders["classifier"],
                                     "--data", files["labelled"], files["other"]])
    assert "several --data files" in err


def test_a_bad_data_file_names_its_line(capsys, tmp_path, folders, files):
    err = refused(capsys, tmp_path, ["--tasks", "prune", "--model", folders["classifier"], "--data", files["bad"]])
    assert "line 3" in err and "missing label" in err


def test_zoo_families_and_checkpoint_lists_are_trajectories(folders):
    from neuronbench.harness.suite.inputs import model_kind

    env = None  # neither needs a model loaded
    assert model_kind("ptb-grid", env) == "trajectory"
    assert model_kind(f"{folders['causal-lm']},{folders['causal-lm']},{folders['causal-lm']}", env) == "trajectory"
    assert model_kind("a/step-1,a/step-2;b/step-1,b/step-2", env) == "trajectory"
