"""Sites by structure on every family `tiny_config` builds: the blocks and FFN are found, the `ffn`
hook sees what a manual forward of the MLP computes, ablation changes exactly the chosen units, and
a model with no recognisable MLP fails with one message naming what was looked for."""
from __future__ import annotations

import functools

import pytest
import torch
import transformers as tf

from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.intervene import ablate
from neuronbench.harness.engine.models import arch_spec, layer_modules, load_model, resolve_arch
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import TINY_FAMILIES, tiny_model, tiny_tokenizer
from families import ffn_act

TEXT = "stocks rallied sharply while the cat sat on the mat"
_BERT = ("encoder.layer", "output.dense", ("intermediate.dense",))
_GATED = ("layers", "mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))
# Written by hand from each family's modelling code: where the blocks, down projection and the
# projections feeding the FFN (gate first) are.
EXPECTED = {
    "bert": _BERT, "roberta": _BERT, "electra": _BERT,
    "distilbert": ("transformer.layer", "ffn.lin2", ("ffn.lin1",)),
    "gpt2": ("h", "mlp.c_proj", ("mlp.c_fc",)), "gptj": ("h", "mlp.fc_out", ("mlp.fc_in",)),
    "gpt_neox": ("layers", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
    "opt": ("decoder.layers", "fc2", ("fc1",)),
    "llama": _GATED, "mistral": _GATED, "qwen2": _GATED, "qwen3": _GATED, "gemma": _GATED, "gemma2": _GATED,
    "gemma3_text": _GATED, "olmo": _GATED, "olmo2": _GATED, "stablelm": _GATED,
    "phi3": ("layers", "mlp.down_proj", ("mlp.gate_up_proj",)),
    "falcon": ("h", "mlp.dense_4h_to_h", ("mlp.dense_h_to_4h",)),
}


@functools.lru_cache(maxsize=None)
def _model(family: str, kind: str = "base"):
    return tiny_model(family, kind)


def _ids(model):
    ids = model.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_every_family_is_covered():
    assert set(EXPECTED) == set(TINY_FAMILIES)


@pytest.mark.parametrize("kind", ["base", "classifier"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_sites_resolve_from_the_module_structure(family, kind):
    model = _model(family, kind)
    spec = arch_spec(model.model)
    assert (spec.layers, spec.down_proj, spec.up_proj) == EXPECTED[family]
    assert spec.fused_gate_up == (family == "phi3")
    assert model.sites("all") == (Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1))
    assert model.width(Site.ffn(1)) == 64 and model.width(Site.resid(1)) == 32
    assert len(layer_modules(model.model)) == 2


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ffn_hook_equals_a_manual_forward_of_the_mlp(family):
    model = _model(family)
    spec = arch_spec(model.model)
    for layer in range(2):
        block = layer_modules(model.model)[layer]
        projs = [block.get_submodule(p) for p in spec.up_proj]
        got, x = {}, {}
        handle = projs[-1].register_forward_pre_hook(lambda m, args: x.setdefault("in", args[0]))
        try:
            with site_hooks(model.model, {Site.ffn(layer): lambda a: got.setdefault("ffn", a.clone())}), \
                    torch.no_grad():
                model.model(**_ids(model))
        finally:
            handle.remove()
        act = ffn_act(model.config)
        with torch.no_grad():
            if spec.fused_gate_up:
                gate, up = projs[0](x["in"]).chunk(2, dim=-1)
                by_hand = act(gate) * up
            elif len(projs) == 2:
                by_hand = act(projs[0](x["in"])) * projs[1](x["in"])
            else:
                by_hand = act(projs[0](x["in"]))
        assert got["ffn"].dim() == 3 and got["ffn"].shape[-1] == 64
        torch.testing.assert_close(got["ffn"], by_hand.view_as(got["ffn"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ablation_changes_exactly_the_chosen_units(family):
    model = _model(family)
    units = torch.tensor([1, 5, 40])
    seen = {}

    def observe(name):
        return lambda acts: seen.__setitem__(name, acts.detach().clone())

    sites = {Site.ffn(0): observe("ffn0"), Site.ffn(1): observe("ffn1")}
    with torch.no_grad():
        with site_hooks(model.model, sites):
            full = model.model(**_ids(model)).last_hidden_state
        clean = dict(seen)
        with ablate(model, {Site.ffn(0): units}, mode="zero"), site_hooks(model.model, sites):
            ablated = model.model(**_ids(model)).last_hidden_state
    others = torch.ones(64, dtype=torch.bool)
    others[units] = False
    assert torch.all(seen["ffn0"][..., units] == 0)
    torch.testing.assert_close(seen["ffn0"][..., others], clean["ffn0"][..., others], rtol=0, atol=0)
    assert not torch.equal(seen["ffn1"], clean["ffn1"])  # the change reaches the next block
    assert not torch.equal(full, ablated)


@pytest.mark.parametrize("family", ["bert", "llama", "phi3"])
def test_an_ffn_as_wide_as_the_hidden_state_resolves_by_module_order(family):
    model = tiny_model(family, hidden=32, ffn=32)
    spec = arch_spec(model.model)
    assert (spec.layers, spec.down_proj, spec.up_proj) == EXPECTED[family]
    assert model.width(Site.ffn(0)) == model.width(Site.resid(0)) == 32


def _mixtral(vocab_size: int):
    return tf.MixtralConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, num_local_experts=2,
                            num_experts_per_tok=1, max_position_embeddings=64, pad_token_id=0)


def test_a_model_without_a_recognisable_mlp_gets_one_clear_error(tmp_path):
    tok = tiny_tokenizer(cls_sep=False)
    model = tf.MixtralForCausalLM(_mixtral(len(tok)))
    with pytest.raises(ValueError, match=r"no recognisable MLP in MixtralDecoderLayer.*looked for one linear "
                                         r"layer outside attention mapping the FFN width F -> hidden size 32"):
        resolve_arch(model)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model '.*' \(mixtral\): no recognisable MLP") as info:
        load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(info.value)


def test_a_model_without_blocks_names_what_was_looked_for():
    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tf.PretrainedConfig(hidden_size=4)
            self.proj = torch.nn.Linear(4, 4)

        @property
        def base_model(self):
            return self

    with pytest.raises(ValueError, match="no repeated transformer blocks"):
        resolve_arch(Flat())
