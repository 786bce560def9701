"""The command line on the packaged real model: outputs, exit codes, and nothing written on errors."""
import json

import pytest

from neuronbench.harness.cli import main

pytestmark = pytest.mark.realmodel


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    # Keep corpora and zoo where set-up put them; give the cache its own folder.
    from neuronbench.harness.engine import paths

    monkeypatch.setattr(paths, "cache_dir", lambda: tmp_path / "cache")


def test_collect_end_to_end_on_minilm_and_real_polarity(tmp_path, capsys):
    out = tmp_path / "col"
    assert main(["collect", "--model", "minilm", "--data", "polarity", "--limit", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "40 examples" in printed and "ffn.5" in printed and "max-1" in printed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sites"] == [f"ffn.{i}" for i in range(6)] and meta["versions"]["torch"]
    assert (out / "stats.safetensors").stat().st_size > 0
    assert main(["collect", "--model", "minilm", "--data", "polarity", "--limit", "40"]) == 0
    assert "cache hit" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["collect", "--model", "no-such-model-xyz", "--data", "polarity"], "not an alias"),
    (["collect", "--model", "minilm", "--data", "no-such-data"], "unknown dataset"),
    (["collect", "--model", "minilm", "--data", "polarity", "--sites", "ffn.9"], "outside the model"),
    (["run", "--tasks", "prunee"], "Did you mean"),
])
def test_bad_input_exits_2_with_one_clear_message_and_writes_nothing(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("neuronbench: error:") == 1
    assert not out.exists()


def test_bad_data_file_names_the_line(tmp_path, capsys):
    bad = tmp_path / "tags.txt"
    bad.write_text("The/DT cat/NN\nsat on/IN\n")
    assert main(["collect", "--model", "minilm", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2" in capsys.readouterr().err


def test_bench_collect_json_has_the_ratios(capsys):
    assert main(["bench", "collect", "--data", "polarity", "--limit", "60", "--repeats", "1",
                 "--batch1-examples", "20", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("bare_tok_s", "collect_tok_s", "ratio", "batch1_tok_s", "speedup_vs_batch1", "peak_rss_mb"):
        assert result[key] > 0


def test_quick_run_writes_results_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--quick", "--tasks", "ppl-trend", "--methods", "random", "weight-distance",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ppl-trend.time_controlled" in printed and "weight-distance" in printed
    assert (out / "results.parquet").is_file() and (out / "config.json").is_file()


def test_models_and_methods_listings(capsys):
    assert main(["models"]) == 0 and "minilm" in capsys.readouterr().out
    assert main(["models", "minilm"]) == 0 and "resid.5" in capsys.readouterr().out
    assert main(["methods"]) == 0 and "txray" in capsys.readouterr().out


def test_a_verb_that_runs_in_one_process_refuses_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["cache", "ls"]) == 2
    assert "runs in one process" in capsys.readouterr().err
