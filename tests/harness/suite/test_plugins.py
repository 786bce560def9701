"""Tasks and methods plug in from outside: the README's task runs as `module:score`, registries
check types on register and lookup, and "not applicable" is decided once, with the reason."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from neuronbench.harness.engine.method import METHODS, Method, Needs, Provides, get_method, not_applicable
from neuronbench.harness.suite.runner import RunConfig, run_suite
from neuronbench.harness.suite.task import TASKS

README = Path(__file__).resolve().parents[3] / "README.md"


@pytest.fixture(scope="module")
def readme_task(tmp_path_factory):
    """The README's "Writing a task" example, written out as the module `readme_task`."""
    section = README.read_text().split("## Writing a task", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "readme_task.py").write_text(code)
    sys.path.insert(0, str(folder))
    yield code
    sys.path.remove(str(folder))
    sys.modules.pop("readme_task", None)
    TASKS._items.pop("top-k-drop", None)  # later tests see the built-in tasks only


def test_the_readme_task_is_complete_short_and_runs_as_module_colon_score(readme_task):
    assert len(readme_task.splitlines()) < 60
    frame, config = run_suite(RunConfig(tasks=("readme_task:score",), methods=("random", "txray"), quick=True),
                              progress=False)
    by = {r["method"]: r for r in frame.iter_rows(named=True)}
    assert by["random"]["status"] == "ok" and by["random"]["metric"] == "top-k-drop.acc_drop"
    assert by["txray"]["status"] == "not_applicable"
    assert "second model stage" in config["not_applicable"]["top-k-drop/txray"]
    assert config["method_settings"] == {"random": {}, "txray": {"average": False, "no_evidence": "neutral"}}
    assert TASKS.get("top-k-drop") is TASKS.get("readme_task:score")


def test_registries_check_types_on_lookup_and_register(readme_task):
    with pytest.raises(KeyError, match="TaskSpec .* not a Task"):
        TASKS.get("readme_task:SPEC")
    with pytest.raises(KeyError, match="not a Method subclass"):
        get_method("readme_task:Params")
    with pytest.raises(KeyError, match="cannot import method"):
        get_method("no_such_module_anywhere:Thing")
    with pytest.raises(TypeError, match="not a Method subclass"):
        METHODS.register("not-a-method")(object)


def test_needs_are_checked_against_what_a_task_provides():
    class Trainer(Method):
        name = "trainer"
        needs = Needs(labels=True, gradients=True, train_budget=200)

        def relevance(self, ctx):
            raise AssertionError("never asked")

    m = Trainer()
    assert not_applicable(m, "relevance", Provides(labels=True, gradients=True)) is None
    assert "does not implement 'stage_change'" in not_applicable(m, "stage_change", Provides(labels=True))
    assert "needs labels and a model with a task head" in not_applicable(m, "relevance", Provides())
    assert "trains for 200 steps" in not_applicable(m, "relevance", Provides(True, False, True, train_budget=50))
    assert not_applicable(get_method("txray"), "relevance", Provides(stages=True)) is None
