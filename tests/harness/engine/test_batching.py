"""Tests for neuronbench.harness.engine.batching: encoding, batch planning under a token budget, padding
and word alignment."""
from __future__ import annotations

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronbench.harness.engine.batching import encode, make_batch, plan_batches
from neuronbench.harness.zoo.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()  # BERT style: [CLS] ... [SEP]


# ---------------------------------------------------------------- plan_batches

@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=0, max_size=50),
       max_tokens=st.integers(1, 300), max_batch=st.integers(1, 12))
def test_plan_covers_each_index_once_longest_first_within_budget(lengths, max_tokens, max_batch):
    batches = plan_batches(lengths, max_tokens, max_batch)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert flat == sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for b in batches:
        assert 1 <= len(b) <= max_batch
        assert len(b) * max(lengths[i] for i in b) <= max_tokens or len(b) == 1
    for b, nxt in zip(batches, batches[1:]):  # greedy: a batch is closed only when the next would not fit
        assert len(b) == max_batch or (len(b) + 1) * lengths[b[0]] > max_tokens, (b, nxt)


def test_plan_small_example():
    assert plan_batches([3, 5, 2, 5], max_tokens=10) == [[1, 3], [0, 2]]
    assert plan_batches([3, 5, 2, 5], max_tokens=100, max_batch=3) == [[1, 3, 0], [2]]
    assert plan_batches([7], max_tokens=3) == [[0]]  # an example over budget goes alone


@pytest.mark.parametrize("max_tokens, max_batch", [(0, 4), (4, 0), (-1, 1)])
def test_plan_rejects_non_positive_budgets(max_tokens, max_batch):
    with pytest.raises(ValueError, match="must be positive"):
        plan_batches([1, 2], max_tokens, max_batch)


# ---------------------------------------------------------------- encode

def test_encode_text_marks_specials_uncounted_unless_asked(tok, sentence_data):
    enc = encode(tok, sentence_data)
    ref = tok(list(sentence_data["text"]))["input_ids"]
    assert enc.input_ids == ref and len(enc) == 10
    assert all(c == [0] + [1] * (len(ids) - 2) + [0] for c, ids in zip(enc.counted, enc.input_ids))
    assert enc.labels == list(sentence_data["label"]) and enc.word_labels is None
    assert enc.example_ids == list(range(10))
    assert encode(tok, sentence_data, with_words=True).n_words[0] == 7  # "the cat sat on the mat ."
    with_special = encode(tok, sentence_data, include_special=True)
    assert all(set(c) == {1} for c in with_special.counted)


def test_encode_words_keeps_word_labels_and_ids(tok, word_data):
    ds = word_data.add_column("id", [10 * i + 3 for i in range(len(word_data))])
    enc = encode(tok, ds)
    assert enc.example_ids == [3, 13, 23, 33, 43, 53]
    assert enc.n_words == [len(w) for w in word_data["words"]]
    assert enc.word_labels == list(word_data["word_labels"])
    assert max(w for w in enc.word_ids[2] if w is not None) == 2


def test_encode_without_text_or_words_names_the_columns(tok):
    with pytest.raises(ValueError, match=r"'text' or a 'words'.*\['sentence'\]"):
        encode(tok, datasets.Dataset.from_dict({"sentence": ["a b"]}))


def test_encode_counts_only_really_truncated_examples(tok):
    ds = datasets.Dataset.from_dict({"text": ["the cat sat", "the cat sat on the mat"]})
    lengths = [len(x) for x in tok(list(ds["text"]))["input_ids"]]  # 5 and 8 with [CLS]/[SEP]
    enc = encode(tok, ds, max_length=lengths[1] + 1)
    assert enc.truncated == 0
    enc = encode(tok, ds, max_length=lengths[1] - 1)
    assert enc.truncated == 1 and len(enc.input_ids[1]) == lengths[1] - 1
    enc = encode(tok, ds, max_length=lengths[1])  # fits exactly: nothing was cut
    assert enc.truncated == 0


# ---------------------------------------------------------------- make_batch

def test_make_batch_pads_right_and_views_only_counted_tokens(tok, sentence_data):
    ds = sentence_data.add_column("id", [100 + i for i in range(10)])
    enc = encode(tok, ds)
    indices = [4, 5]  # a long and a short sentence, labels 1 and 0
    batch = make_batch(enc, indices, pad_id=tok.pad_token_id, num_labels=2)
    T, n = len(enc.input_ids[4]), len(enc.input_ids[5])
    assert n < T
    assert batch.input_ids.shape == (2, T) and batch.attention_mask.sum(1).tolist() == [T, n]
    assert batch.input_ids[1, n:].eq(tok.pad_token_id).all()
    view = batch.view
    expected_rows = list(range(1, T - 1)) + [T + p for p in range(1, n - 1)]
    assert view.rows.tolist() == expected_rows
    assert view.weight.sum() == len(expected_rows) and view.weight[view.rows].eq(1).all()
    assert view.token_ids.tolist() == enc.input_ids[4][1:-1] + enc.input_ids[5][1:-1]
    assert view.example_ids.tolist() == [104] * (T - 2) + [105] * (n - 2)
    assert view.positions.tolist() == list(range(1, T - 1)) + list(range(1, n - 1))
    # sentence labels: weight 1 on every counted token of the example, under its label
    assert view.label_weight.shape == (2, 2 * T)
    assert view.label_weight[1].nonzero().squeeze(1).tolist() == list(range(1, T - 1))
    assert view.label_weight[0].nonzero().squeeze(1).tolist() == [T + p for p in range(1, n - 1)]


@pytest.mark.parametrize("alignment", ["first", "last", "mean"])
def test_word_alignment_picks_the_right_subword_tokens(tok, word_data, alignment):
    enc = encode(tok, word_data)
    offsets = [0]
    for n in enc.n_words[:-1]:
        offsets.append(offsets[-1] + n)
    indices = [1, 2]  # "stocks rallied sharply yesterday", "unbelievably dull movie": multi-piece words
    batch = make_batch(enc, indices, tok.pad_token_id, alignment, num_labels=6, word_offsets=offsets)
    T = batch.input_ids.shape[1]
    expected: dict[int, list[tuple[int, float]]] = {}
    for b, i in enumerate(indices):
        positions: dict[int, list[int]] = {}
        for pos, w in enumerate(enc.word_ids[i]):
            if w is not None:
                positions.setdefault(w, []).append(pos)
        assert any(len(p) > 1 for p in positions.values())  # the test needs split words
        for w, pos in positions.items():
            chosen = {"first": pos[:1], "last": pos[-1:], "mean": pos}[alignment]
            expected[offsets[i] + w] = [(b * T + p, 1 / len(chosen)) for p in chosen]
    got: dict[int, list[tuple[int, float]]] = {}
    for row, word, weight in zip(batch.word_rows.tolist(), batch.word_index.tolist(),
                                 batch.word_row_weight.tolist()):
        got.setdefault(word, []).append((row, pytest.approx(weight)))
    assert got == expected
    # word-label weights: each word contributes weight 1 to its own label, spread over its rows
    lw = batch.view.label_weight
    labels = [lab for i in indices for lab in enc.word_labels[i]]
    assert lw.sum().item() == pytest.approx(len(labels))
    assert lw.sum(1).tolist() == pytest.approx([labels.count(k) for k in range(6)])


def test_unknown_alignment_is_rejected(tok, word_data):
    with pytest.raises(ValueError, match="unknown alignment 'middle'"):
        make_batch(encode(tok, word_data), [0], tok.pad_token_id, "middle")
