"""Tests for neuronbench.harness.engine.models: site resolution on every tiny architecture, what each site
sees, model loading errors, and fingerprints."""
from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from neuronbench.harness.engine import models
from neuronbench.harness.engine.hooks import site_hooks
from neuronbench.harness.engine.models import load_model, model_fingerprint, site_module, site_width
from neuronbench.harness.engine.sites import Site
from neuronbench.harness.zoo.tiny import TINY_ARCHS, tiny_model, tiny_tokenizer

KINDS = ("base", "causal-lm", "classifier")
TEXT = "stocks rallied sharply while the cat sat on the mat"


def _harness_acts(model, sites) -> dict[Site, torch.Tensor]:
    """Activations as the harness sees them: observe-only functions in `site_hooks`."""
    got = {}
    fns = {site: (lambda acts, site=site: got.__setitem__(site, acts.clone())) for site in sites}
    with site_hooks(model.model, fns), torch.no_grad():
        model.model(**_ids(model))
    return got


def _ids(model):
    ids = model.tokenizer(TEXT, return_tensors="pt")["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---------------------------------------------------------------- site resolution

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_sites_resolve_to_the_block_and_down_projection(tiny, reference, arch, kind):
    model = tiny(arch, kind)
    assert model.num_layers == 2
    assert model.sites("all") == (Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1))
    for layer in range(2):
        assert site_module(model.model, Site.resid(layer)) is reference.block_of(model, layer)
        assert site_module(model.model, Site.ffn(layer)) is reference.mlp_parts(model, layer)["down"]
        assert model.width(Site.resid(layer)) == model.config.hidden_size == 32
        assert model.width(Site.ffn(layer)) == 64  # the intermediate (ffn) size


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_ffn_site_is_the_activation_computed_by_hand_from_the_mlp_input(tiny, reference, arch):
    model = tiny(arch)
    for layer in range(2):
        parts = reference.mlp_parts(model, layer)
        mlp_in = {}
        handle = parts["mlp_in"].register_forward_pre_hook(lambda m, args: mlp_in.setdefault("x", args[0]))
        try:
            acts = _harness_acts(model, [Site.ffn(layer)])[Site.ffn(layer)]
        finally:
            handle.remove()
        x = mlp_in["x"]
        with torch.no_grad():
            pre = parts["up"](x)
            by_hand = parts["act"](parts["gate"](x)) * pre if "gate" in parts else parts["act"](pre)
        assert acts.shape[-1] == 64
        torch.testing.assert_close(acts, by_hand, rtol=0, atol=1e-6)


# Decoders apply a final norm to the last entry of hidden_states (BERT has none).
_FINAL_NORM = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "llama": "norm"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_resid_site_equals_the_hidden_states_the_model_returns(tiny, arch):
    """`resid.l` is hidden_states[l + 1]; decoders apply a final norm to the last hidden state, so
    there the last block's output, normed, is hidden_states[-1]."""
    model = tiny(arch)
    sites = [Site.resid(0), Site.resid(1)]
    got = _harness_acts(model, sites)
    with torch.no_grad():
        hidden = model.model(**_ids(model), output_hidden_states=True).hidden_states
    assert len(hidden) == 3
    torch.testing.assert_close(got[Site.resid(0)], hidden[1], rtol=0, atol=0)
    norm = getattr(model.model.base_model, _FINAL_NORM[arch]) if arch in _FINAL_NORM else None
    last = got[Site.resid(1)]
    with torch.no_grad():
        torch.testing.assert_close(norm(last) if norm else last, hidden[2], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- loading

def test_load_model_from_a_saved_folder_detects_kind_and_sites(tiny, tmp_path):
    source = tiny("bert", "classifier")
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    assert loaded.kind == "classifier" and loaded.source == str(tmp_path)
    assert loaded.sites("ffn") == (Site.ffn(0), Site.ffn(1))
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.padding_side == "right"
    assert not loaded.model.training


def test_unknown_model_id_offline_is_a_value_error_listing_aliases(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not an alias.*minilm") as info:
        load_model("minilmm-does-not-exist/xyz", device="cpu")
    assert "Pass a local folder or an alias" in str(info.value)


def test_close_alias_typo_is_suggested(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="Did you mean minilm"):
        load_model("minlm", device="cpu")


def test_folder_without_config_is_file_not_found(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_an_architecture_outside_any_table_loads_by_structure(tmp_path):
    """OPT was refused while sites came from a table of model types; its structure is enough."""
    import transformers as tf

    tok = tiny_tokenizer(cls_sep=False)
    config = tf.OPTConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                          num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
    tf.OPTModel(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert model.sites("all") == (Site.ffn(0), Site.resid(0))
    assert model.width(Site.ffn(0)) == 32 and models.arch_spec(model.model).down_proj == "fc2"


@pytest.mark.parametrize("spec", ["ffn.99", "resid.2", "all,resid.5"])
def test_site_outside_the_model_raises_naming_the_layer_count(tiny, spec):
    model = tiny("gpt2")
    with pytest.raises(ValueError, match="outside the model: it has 2 layers"):
        model.sites(spec)


@pytest.mark.parametrize("site", [Site.ffn(99), Site.resid(99), Site.ffn(2)])
def test_site_module_and_width_reject_layers_outside_the_model(tiny, site):
    model = tiny("llama")
    with pytest.raises(ValueError, match=str(site)):
        site_module(model.model, site)
    with pytest.raises(ValueError, match=str(site)):
        site_width(model.model, site)


def test_alias_registry_lists_minilm_and_refuses_duplicates():
    assert "minilm" in models.aliases()
    with pytest.raises(ValueError, match="already registered"):
        models.register_alias("minilm", lambda: "x", "duplicate")


# ---------------------------------------------------------------- fingerprints

@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fingerprint_is_stable_for_a_seed_and_changes_with_it(arch):
    a, b, c = tiny_model(arch, seed=0), tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    with torch.no_grad():  # a single changed weight changes it
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert model_fingerprint(b.model) != a.fingerprint()


def test_fingerprint_depends_on_content_not_on_the_folder(tiny, tmp_path):
    """Same weights and config copied to two folders must share cached statistics."""
    source = tiny("bert", "classifier")
    for name in ("a", "b"):
        source.model.save_pretrained(tmp_path / name)
        source.tokenizer.save_pretrained(tmp_path / name)
    a, b = (load_model(str(tmp_path / name), device="cpu") for name in ("a", "b"))
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.realmodel
def test_packaged_minilm_loads_offline_with_its_sites():
    model = load_model("minilm", device="cpu")
    assert model.config.model_type == "bert" and model.num_layers == 6
    assert model.width(Site.ffn(5)) == 1536 and model.width(Site.resid(0)) == 384


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_device_map_offload_keeps_hooks_statistics_and_ablations(tmp_path, sentence_data, arch):
    """accelerate's big-model dispatch on CPU: a `max_memory` below the model's size keeps the first
    modules in memory and offloads the rest to disk (weights on the meta device, loaded by hooks at
    each forward); collection and masked evaluation hook the dispatched modules and match the plain model."""
    from neuronbench.harness.engine.collect import CollectConfig, collect
    from neuronbench.harness.engine.intervene import MaskSet, evaluate_masks

    folder = tmp_path / "model"
    source = tiny_model(arch, layers=4, tokenizer=tiny_tokenizer(cls_sep=arch == "bert"))
    source.model.save_pretrained(folder)
    source.tokenizer.save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in source.model.parameters())
    plain = load_model(str(folder), device="cpu")
    split = load_model(str(folder), placement=models.Placement(max_memory={"cpu": size // 2},
                                                               offload_folder=str(tmp_path / "offload")))
    assert split.dispatched and {"cpu", "disk"} <= set(split.model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in split.model.parameters()) and split.device == torch.device("cpu")
    with pytest.raises(ValueError, match="device_map"):
        split.to("cpu")
    assert len(split.fingerprint()) == 16 and split.fingerprint() == split.fingerprint()

    cfg = CollectConfig(sites=plain.sites("all"), stats=("moments", "topk", "max1"))
    want, got = collect(plain, sentence_data, cfg, progress=False), collect(split, sentence_data, cfg, progress=False)
    for site in cfg.sites:
        torch.testing.assert_close(got[site].moments.mean, want[site].moments.mean)
        torch.testing.assert_close(got[site].topk.values, want[site].topk.values)
        assert torch.equal(got[site].topk.example_ids, want[site].topk.example_ids)
    ffn = plain.sites("ffn")
    sets = [{}, {ffn[0]: torch.arange(8)}, {ffn[-1]: torch.arange(32)}]
    last = (lambda out, batch: out.last_hidden_state[:, 1])  # first real token, every model kind
    scores = [evaluate_masks(m, sentence_data, MaskSet.from_sets(m, sets), last) for m in (plain, split)]
    torch.testing.assert_close(scores[1], scores[0])
    assert not torch.allclose(scores[0][0], scores[0][2])  # the ablations took effect
