"""The method API: every registered baseline through every verb it declares, and bad answers."""
import datasets
import pytest
import torch

from neuronbench.harness.engine.method import (METHODS, VERBS, Method, MethodContext, MethodOutputError, NeuronScores,
                                        NotApplicable, call_verb, get_method)
from neuronbench.harness.engine.sites import NeuronIndex, Site
from neuronbench.harness.zoo.tiny import tiny_model

TEXTS = ["the cat sat on the mat", "stocks rallied sharply yesterday", "this movie is wonderful",
         "the plot was boring and badly written", "he quickly walked home singing", "a dog was running"]
VOCAB = ("noun", "verb", "short", "long")


def _descriptors(word: str) -> list[str]:
    out = ["short" if len(word) <= 3 else "long"]
    out.append("verb" if word.endswith(("ed", "ing")) or word in {"sat", "was"} else "noun")
    return out


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    from neuronbench.harness.engine.cache import Cache

    cache = Cache(tmp_path_factory.mktemp("cache"))
    child = tiny_model("bert", "classifier", seed=1)
    parent = tiny_model("bert", "classifier", seed=0)
    sentences = datasets.Dataset.from_dict({"id": list(range(12)), "text": TEXTS * 2, "label": [0, 1] * 6})
    words = [t.split() for t in TEXTS] * 2
    worded = datasets.Dataset.from_dict({
        "id": list(range(12)), "words": words,
        "word_labels": [[int(w.endswith("ed")) for w in ws] for ws in words],
        "word_descriptors": [[_descriptors(w) for w in ws] for ws in words]})
    common = dict(sites=child.sites("ffn"), seed=3, cache=cache, label_names=("neg", "pos"))
    return {
        "relevance": MethodContext(child, data=sentences, data_id="s", parent=parent, **common),
        "stage_change": MethodContext(child, data=sentences, data_id="s", parent=parent, **common),
        "descriptors": MethodContext(child, data=worded, data_id="w", parent=parent, proposer="stub", **common),
        "attribute_positions": MethodContext(child, data=sentences, data_id="s", parent=parent, **common),
    }


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("verb", VERBS)
def test_every_baseline_answers_every_verb_it_declares(contexts, name, verb):
    method = get_method(name)
    args = (VOCAB,) if verb == "descriptors" else (0,) if verb == "attribute_positions" else ()
    if not method.supports(verb):
        with pytest.raises(NotApplicable, match=verb):
            call_verb(method, verb, contexts[verb], *args)
        return
    out = call_verb(method, verb, contexts[verb], *args)  # validated: raises on a malformed answer
    if verb == "relevance":
        assert out.scores.shape[-1] == contexts[verb].index.size


def test_random_is_seeded(contexts):
    ctx = contexts["relevance"]
    a = call_verb(get_method("random"), "relevance", ctx).scores
    b = call_verb(get_method("random"), "relevance", ctx).scores
    assert torch.equal(a, b)


class _Bad(Method):
    name = "bad"

    def __init__(self, answer):
        self.answer = answer

    def relevance(self, ctx):
        return self.answer(ctx)

    def descriptors(self, ctx, vocabulary):
        return self.answer(ctx)

    def stage_change(self, ctx):
        return self.answer(ctx)


@pytest.mark.parametrize("verb,answer,message", [
    ("relevance", lambda c: NeuronScores(c.index, torch.full((c.index.size,), float("nan"))), "NaN"),
    ("relevance", lambda c: NeuronScores(c.index, torch.zeros(c.index.size - 1)), "shape"),
    ("relevance", lambda c: NeuronScores(NeuronIndex.build({Site.ffn(0): 64}), torch.zeros(64)), "sites"),
    ("relevance", lambda c: torch.zeros(c.index.size), "expected NeuronScores"),
    ("descriptors", lambda c: {0: ["noun", "noun"]}, "twice"),
    ("descriptors", lambda c: {0: ["adjective"]}, "outside the vocabulary"),
    ("descriptors", lambda c: {10**6: ["noun"]}, "outside 0.."),
    ("stage_change", lambda c: float("inf"), "finite"),
])
def test_malformed_answers_are_rejected_naming_method_and_defect(contexts, verb, answer, message):
    args = (VOCAB,) if verb == "descriptors" else ()
    with pytest.raises(MethodOutputError, match=message) as err:
        call_verb(_Bad(answer), verb, contexts[verb], *args)
    assert "'bad'" in str(err.value)


def test_unknown_method_suggests_a_name():
    with pytest.raises(KeyError, match="Did you mean random"):
        get_method("randomm")


def test_module_colon_class_loads_a_user_method(tmp_path, monkeypatch, contexts):
    (tmp_path / "usermethods.py").write_text(
        "import torch\nfrom neuronbench.harness.engine.method import Method, NeuronScores\n"
        "class Ones(Method):\n    name = 'ones'\n"
        "    def relevance(self, ctx):\n        return NeuronScores(ctx.index, torch.ones(ctx.index.size))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = call_verb(get_method("usermethods:Ones"), "relevance", contexts["relevance"])
    assert out.scores.sum() == contexts["relevance"].index.size


def test_settings_record_json_attributes_and_leave_the_rest_out():
    from dataclasses import dataclass

    @dataclass
    class Recipe:
        steps: int
        grid: tuple

    class Configured(Method):
        name = "configured"

        def __init__(self):
            self.recipe, self.lambdas, self.tensor = Recipe(3, ((0.1, 0.2),)), {"l1": 1e-3}, torch.zeros(2)
            self.mixed, self._private = (1, torch.ones(1)), "hidden"

    assert Configured().settings() == {"recipe": {"steps": 3, "grid": [[0.1, 0.2]]}, "lambdas": {"l1": 1e-3}}
    assert get_method("integrated-gradients", steps=4).settings()["steps"] == 4
