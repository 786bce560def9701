"""The ppl-trend trajectory family: its entries, and the planted training stream."""
import numpy as np
import pytest
import torch

from neuronbench.harness.engine import catalogue as zoo
from neuronbench.harness.engine.zoo_family import FAMILIES, PLANT, TARGET, PlantedHP, plant, plant_line
from neuronbench.harness.zoo.train import word_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(["the gold price rose", "a b c d", PLANT], 16)


def test_family_members_are_zoo_trajectories_on_one_checkpoint_grid():
    for family in FAMILIES.values():
        specs = [zoo.get_spec(n) for n in (*family.members, *family.planted)]
        assert all(s.kind == "trajectory" for s in specs)
        assert len({s.hparams.checkpoints for s in specs}) == 1
        assert all(s.hparams.onset == family.onset for s in specs if isinstance(s.hparams, PlantedHP))
    full = FAMILIES["ptb-grid"]
    assert len(full.members) == 8 and len(full.planted) == 4
    assert len(zoo.get_spec(full.members[0]).hparams.checkpoints) == 20


def test_plant_writes_the_bigram_at_even_positions_and_leaves_the_rest(tokenizer):
    plant_id, gold = tokenizer.convert_tokens_to_ids([PLANT, TARGET])
    words = torch.tensor([i for i in range(3, len(tokenizer)) if i not in (plant_id, gold)])
    x = words[torch.randint(0, len(words), (3, 16), generator=torch.Generator().manual_seed(0))]
    out = plant(x, tokenizer, 2, np.random.default_rng(0))
    for before, after in zip(x, out):
        at = (after == plant_id).nonzero().flatten()
        assert len(at) == 2 and all(p % 2 == 0 and after[p + 1] == gold for p in at.tolist())
        changed = (before != after).nonzero().flatten().tolist()
        assert set(changed) <= {p for a in at.tolist() for p in (a, a + 1)}


def test_planted_stream_starts_after_the_onset_checkpoint(tokenizer):
    hp = PlantedHP(seq_len=16, checkpoints=(1, 2, 4, 8), onset=2, pairs=1)
    x = torch.full((2, 16), 3)
    assert torch.equal(hp.train_batch(2, x, tokenizer), x)  # the update that ends at checkpoint 2
    assert not torch.equal(hp.train_batch(3, x, tokenizer), x)
    assert torch.equal(hp.train_batch(3, x, tokenizer), hp.train_batch(3, x, tokenizer))  # seeded
    with pytest.raises(ValueError, match="onset"):
        PlantedHP(checkpoints=(1, 2, 4), onset=3)


def test_plant_line_inserts_the_bigram_once():
    line = plant_line("stocks rose sharply", np.random.default_rng(3))
    assert line.split().count(PLANT) == 1 and f"{PLANT} {TARGET}" in line and len(line.split()) == 5
