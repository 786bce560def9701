"""Tests for neuronbench.harness.engine.sites: Site values, CLI site specs, and flat neuron ids."""
from __future__ import annotations

import itertools

import pytest
import torch

from neuronbench.harness.engine.sites import NO_SITE, OUT_OF_RANGE, UNKNOWN_KIND, NeuronIndex, Site, parse_sites

WIDTHS = {Site.resid(1): 4, Site.ffn(0): 6, Site.resid(0): 4, Site.ffn(1): 6}


# ---------------------------------------------------------------- Site

@pytest.mark.parametrize("layer, kind", [(0, "mlp"), (0, "FFN"), (-1, "ffn"), (1.0, "ffn"), ("1", "resid")])
def test_invalid_site_raises_naming_the_value(layer, kind):
    with pytest.raises(ValueError, match=repr(layer) if kind in ("ffn", "resid") else repr(kind)):
        Site(layer, kind)


@pytest.mark.parametrize("text, site", [("ffn.3", Site(3, "ffn")), ("resid.0", Site(0, "resid")),
                                        ("ffn.12", Site.ffn(12))])
def test_parse_and_str_round_trip(text, site):
    assert Site.parse(text) == site
    assert str(site) == text
    assert Site.parse(str(site)) == site


@pytest.mark.parametrize("text", ["ffn", "ffn.", "ffn.x", "ffn.-1", "3.ffn", "mlp.3", ""])
def test_parse_rejects_malformed_text(text):
    with pytest.raises(ValueError):
        Site.parse(text)


def test_sites_are_hashable_values_ordered_by_layer_then_kind():
    assert Site.ffn(2) == Site(2, "ffn") and len({Site.ffn(2), Site(2, "ffn")}) == 1
    assert sorted([Site.resid(1), Site.ffn(1), Site.resid(0)]) == [Site.resid(0), Site.ffn(1), Site.resid(1)]
    with pytest.raises(AttributeError):
        Site.ffn(0).layer = 3  # frozen


# ---------------------------------------------------------------- parse_sites

@pytest.mark.parametrize("spec, expected", [
    ("ffn", [Site.ffn(0), Site.ffn(1)]),
    ("resid", [Site.resid(0), Site.resid(1)]),
    ("all", [Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1)]),
    (" resid.1 , ffn.0 ,ffn.0", [Site.ffn(0), Site.resid(1)]),
    ("ffn,resid.1", [Site.ffn(0), Site.ffn(1), Site.resid(1)]),
])
def test_parse_sites_specs_give_sorted_unique_sites(spec, expected):
    assert parse_sites(spec, num_layers=2) == tuple(expected)


def test_parse_sites_accepts_a_site_or_an_iterable_in_canonical_order():
    assert parse_sites(Site.ffn(3), 2) == (Site.ffn(3),)
    assert parse_sites([Site.resid(1), Site.ffn(0)], 2) == (Site.ffn(0), Site.resid(1))


@pytest.mark.parametrize("spec", ["", " , ", "ffn.x", "mlp"])
def test_parse_sites_rejects_empty_or_malformed_specs(spec):
    with pytest.raises(ValueError):
        parse_sites(spec, 2)


# ---------------------------------------------------------------- NeuronIndex

def test_index_ids_do_not_depend_on_the_order_sites_were_given():
    indices = [NeuronIndex.build(dict(order)) for order in itertools.permutations(WIDTHS.items())]
    assert all(ix == indices[0] for ix in indices)
    ix = indices[0]
    assert ix.sites == (Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1))
    assert ix.widths == (6, 4, 6, 4) and ix.size == 20
    assert [ix.offset(s) for s in ix.sites] == [0, 6, 10, 16]


def test_flat_unflat_round_trip_covers_every_neuron_once():
    ix = NeuronIndex.build(WIDTHS)
    seen = []
    for site in ix.sites:
        for i in range(ix.width(site)):
            flat = ix.flat(site, i)
            assert ix.unflat(flat) == (site, i)
            seen.append(flat)
    assert sorted(seen) == list(range(ix.size))
    assert torch.equal(ix.flat(Site.ffn(1), torch.arange(3)), torch.tensor([10, 11, 12]))


@pytest.mark.parametrize("bad", [-1, 20, 100])
def test_unflat_outside_range_raises(bad):
    with pytest.raises(IndexError, match=str(bad)):
        NeuronIndex.build(WIDTHS).unflat(bad)


def test_offset_of_unknown_site_raises_key_error_naming_it():
    with pytest.raises(KeyError, match="ffn.5"):
        NeuronIndex.build(WIDTHS).offset(Site.ffn(5))


def test_split_concat_round_trip_on_values():
    ix = NeuronIndex.build(WIDTHS)
    values = torch.arange(ix.size, dtype=torch.float32)[None].repeat(3, 1)  # (3, size): batched too
    parts = ix.split(values)
    assert list(parts) == list(ix.sites)
    for site, part in parts.items():
        start = ix.offset(site)
        assert torch.equal(part, values[:, start:start + ix.width(site)])
    assert torch.equal(ix.concat(parts), values)
    assert torch.equal(ix.concat(dict(reversed(list(parts.items())))), values)


def test_split_flat_ids_groups_them_by_site_as_local_indices():
    ix = NeuronIndex.build(WIDTHS)
    ids = torch.tensor([19, 0, 7, 5, 10, 16])
    parts = ix.split(ids)
    assert set(parts) == {Site.ffn(0), Site.resid(0), Site.ffn(1), Site.resid(1)}
    assert parts[Site.ffn(0)].tolist() == [0, 5]
    assert parts[Site.resid(0)].tolist() == [1]
    assert parts[Site.ffn(1)].tolist() == [0]
    assert sorted(parts[Site.resid(1)].tolist()) == [0, 3]
    assert Site.ffn(1) not in ix.split(torch.tensor([1, 2], dtype=torch.int32))  # empty sites left out


def test_split_and_concat_reject_wrong_shapes():
    ix = NeuronIndex.build(WIDTHS)
    with pytest.raises(ValueError, match="20"):
        ix.split(torch.zeros(19))
    parts = ix.split(torch.zeros(20))
    del parts[Site.ffn(1)]
    with pytest.raises(KeyError, match="ffn.1"):
        ix.concat(parts)


def test_locate_maps_a_table_of_neurons_to_flat_ids_and_says_why_not():
    index = NeuronIndex.build({Site(0, "ffn"): 4, Site(1, "resid"): 3})
    kinds, layers = ["ffn", "resid", "resid", "ffn", "attn", "resid"], [0, 1, 1, 1, 0, 1]
    flat, problem = index.locate(kinds, layers, [3, 0, 2, 0, 0, 3])
    assert flat.tolist() == [3, 4, 6, -1, -1, -1]
    assert problem.tolist() == [0, 0, 0, NO_SITE, UNKNOWN_KIND, OUT_OF_RANGE]
    assert [index.flat(*index.unflat(i)) for i in flat[:3].tolist()] == flat[:3].tolist()
