"""`contrast`: ties each neuron to the descriptors (or labels) whose words its word-level activation
separates best from the other words, by AUROC: the supervised floor for the neuron-descriptor task
(SEEDS.md section 3), with no generative model, only the data's descriptor sets."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neuronbench.harness.engine.batching import encode
from neuronbench.harness.engine.collect import CollectConfig
from neuronbench.harness.engine.data import descriptor_matrix
from neuronbench.harness.engine.method import Method, MethodContext, Needs, NeuronScores, register_method
from neuronbench.harness.engine.metrics import auroc_matrix as auroc
from neuronbench.harness.engine.metrics import average_ranks
from neuronbench.harness.engine.sites import Site

__all__ = ["Contrast", "auroc", "average_ranks", "descriptor_matrix", "rank_descriptors"]


def rank_descriptors(auc: torch.Tensor, vocabulary: tuple[str, ...], top: int = 10) -> list[list[str]]:
    """Per neuron, the labels with AUROC > 0.5, best first (ties in vocabulary order), at most `top`.

    Args:
        auc: (V, N) AUROC per label (row, in `vocabulary` order) and neuron; NaN never qualifies.
        vocabulary: the V label names.
        top: how many to keep.
    """
    if auc.shape[0] != len(vocabulary):
        raise ValueError(f"auc has {auc.shape[0]} rows for {len(vocabulary)} vocabulary entries")
    vals, idx = auc.nan_to_num(nan=-1.0).sort(dim=0, descending=True, stable=True)
    vals, idx = vals[:top].T.tolist(), idx[:top].T.tolist()
    return [[vocabulary[i] for v, i in zip(vs, ix) if v > 0.5] for vs, ix in zip(vals, idx)]


@dataclass
class WordActivations:
    """Word-level activations of `ctx.data`, words in dataset order.

    Attributes:
        acts: per site, (W, N) float16 (a memory map of the cached matrix).
        kept: (W,) bool; False for a word with no token (cut by truncation, or empty), whose row
            was never written and must not count as a zero activation.
        example: (W,) position in `ctx.data` of each word's example.
    """

    acts: dict[Site, np.ndarray]
    kept: np.ndarray
    example: np.ndarray


def word_activations(ctx: MethodContext) -> WordActivations:
    """Collect (cached) the dense word matrices of `ctx.sites`, with which rows hold a real word."""
    col = ctx.collect(stats=(), dense_words=True)
    # Re-tokenised exactly as the collector did, to know which words kept a token.
    cfg = CollectConfig(sites=ctx.sites, stats=(), **{**ctx.collect_defaults, "dense_words": True})
    enc = encode(ctx.model.tokenizer, ctx.data, min(cfg.max_length, ctx.model.max_length),
                 cfg.include_special, with_words=True)
    offsets = np.concatenate([[0], np.cumsum(enc.n_words)]).astype(np.int64)
    kept = np.zeros(int(offsets[-1]), dtype=bool)
    for start, wids in zip(offsets, enc.word_ids):
        kept[[start + w for w in set(wids) if w is not None]] = True
    example = np.repeat(np.arange(len(enc)), enc.n_words)
    for site, mat in col.dense_words.items():
        if mat.shape[0] != kept.size:
            raise ValueError(f"the word matrix of {site} has {mat.shape[0]} rows for {kept.size} words; "
                             "clear the cache entry of this collection")
    return WordActivations(col.dense_words, kept, example)


@register_method("contrast")
class Contrast(Method):
    """Word-level AUROC of every neuron against every descriptor or label.

    `descriptors`: for each neuron the vocabulary entries with AUROC > 0.5 (activation higher on
    the words that carry it), best first, at most `top`. `relevance`: the AUROC for
    `ctx.concept`, or one row per concept when it is None. Concepts are the descriptors of
    `word_descriptors`, the `word_labels`, or for sentence data each word inheriting its sentence's
    `label`. A concept without positive or negative words scores 0.5 (chance) everywhere.

    Args:
        top: descriptors kept per neuron.
        chunk_elems: words x neurons ranked at once.
    """

    name = "contrast"
    needs = Needs(labels=True)

    def __init__(self, top: int = 10, chunk_elems: int = 1 << 22):
        self.top, self.chunk_elems = top, chunk_elems

    def descriptors(self, ctx: MethodContext, vocabulary: tuple[str, ...]) -> dict[int, list[str]]:
        words = word_activations(ctx)
        labels = descriptor_matrix(ctx.data, vocabulary)
        if labels.shape[0] != words.kept.size:
            raise ValueError(f"{labels.shape[0]} words carry descriptor lists but the collection has "
                             f"{words.kept.size} words")
        out: dict[int, list[str]] = {}
        index = ctx.index
        for site in index.sites:
            auc = self._auroc(ctx, words, site, labels)
            for i, ranked in enumerate(rank_descriptors(auc, tuple(vocabulary), self.top)):
                out[index.offset(site) + i] = ranked
        return out

    def relevance(self, ctx: MethodContext) -> NeuronScores:
        words = word_activations(ctx)
        names, labels = _concept_labels(ctx, words)
        if ctx.concept is not None:
            if ctx.concept not in names:
                raise KeyError(f"concept {ctx.concept!r} is not among the data's concepts {list(names)[:20]}")
            keep = names.index(ctx.concept)
            names, labels = (ctx.concept,), labels[:, keep:keep + 1]
        index = ctx.index
        per_site = {s: self._auroc(ctx, words, s, labels).nan_to_num(nan=0.5).float() for s in index.sites}
        scores = index.concat(per_site)  # (C, N)
        if ctx.concept is not None:
            return NeuronScores(index, scores[0])
        return NeuronScores(index, scores, concepts=names)

    def _auroc(self, ctx: MethodContext, words: WordActivations, site: Site, labels: torch.Tensor) -> torch.Tensor:
        # One site's kept rows in memory (float16), so the column chunks do not re-read the file.
        acts = np.asarray(words.acts[site][words.kept])
        return auroc(acts, labels[torch.from_numpy(words.kept)], self.chunk_elems, ctx.model.device)


def _concept_labels(ctx: MethodContext, words: WordActivations) -> tuple[tuple[str, ...], torch.Tensor]:
    """Concept names and the (W, C) bool word x concept matrix of `ctx.data`."""
    data = ctx.data
    if "word_descriptors" in data.column_names:
        names = tuple(sorted({d for descs in data["word_descriptors"] for ds in descs for d in ds}))
        return names, descriptor_matrix(data, names)
    if "word_labels" in data.column_names:
        per_word = torch.tensor([lab for labs in data["word_labels"] for lab in labs], dtype=torch.int64)
    elif "label" in data.column_names:
        per_word = torch.as_tensor(data["label"], dtype=torch.int64)[torch.from_numpy(words.example)]
    else:
        raise ValueError(f"contrast relevance needs `word_descriptors`, `word_labels` or `label`; the data has "
                         f"{data.column_names}")
    if per_word.numel() != words.kept.size:
        raise ValueError(f"{per_word.numel()} word labels for {words.kept.size} words in the collection")
    n = len(ctx.label_names) if ctx.label_names else int(per_word.max()) + 1 if per_word.numel() else 0
    names = tuple(ctx.label_names) if ctx.label_names else tuple(str(i) for i in range(n))
    return names, per_word[:, None] == torch.arange(n)[None, :]
