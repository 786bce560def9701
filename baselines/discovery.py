"""`discovery`: the neuron-descriptor paper's method (SEEDS.md section 3). The task's generative LM
proposes short descriptors for every sentence the method may read; the method maps them onto the
task's vocabulary by sentence embedding, and ties each neuron to the descriptors over-represented
among the sentences that activate it most. It reads no labels: only text, the generator and the model.
"""
from __future__ import annotations

import functools
import logging

import numpy as np

from neuronbench.harness.engine.discovery import (assign, make_embedder, make_proposer, normalise, propose,
                                                  sentence_means)
from neuronbench.harness.engine.method import Method, MethodContext, Needs, register_method

from .contrast import word_activations

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _proposer(name: str, batch_size: int):
    return make_proposer(name, batch_size)


@functools.lru_cache(maxsize=2)
def _embedder(name: str):
    return make_embedder(name)


def enrichment(acts_SN: np.ndarray, present_SV: np.ndarray, top_fraction: float, min_hits: int) -> np.ndarray:
    """(N, V) smoothed log odds ratio of each descriptor among a neuron's top sentences against
    all sentences; -inf where it is not over-represented or has fewer than `min_hits` top hits.

    A neuron's top sentences are its `ceil(top_fraction * S)` most activating ones.
    """
    n_sent = len(acts_SN)
    m = max(1, int(np.ceil(top_fraction * n_sent)))
    top = np.argsort(-acts_SN, axis=0, kind="stable")[:m]  # (m, N)
    present = present_SV.astype(np.float64)
    hits = present[top].sum(0)  # (N, V)
    base = present.sum(0)  # (V,)
    rate_top = (hits + 0.5) / (m + 1.0)
    rate_all = (base + 0.5) / (n_sent + 1.0)
    score = np.log(rate_top / (1 - rate_top)) - np.log(rate_all / (1 - rate_all))
    return np.where((hits >= min_hits) & (hits / m > base / n_sent), score, -np.inf)


@register_method("discovery")
class Discovery(Method):
    """Generate, map, tie (Mondal et al., arXiv 2401.16731).

    `descriptors`: the generator (`ctx.proposer`, else `generator`) proposes topics for each
    sentence of `ctx.data` (few-shot completion, cached); each proposal is mapped to the most
    similar vocabulary entry (`embedder`, cosine >= `similarity`); a neuron's activation on a
    sentence is its mean over the sentence's words (last sub-token); the descriptors whose log
    odds among the neuron's top `top_fraction` sentences exceed those among all sentences (at
    least `min_hits` top sentences) are its answer, best first, at most `top`.

    Args:
        generator: the generator when the task names none (`smollm2-135m`, a folder, or `stub`);
            with neither, the method is not applicable.
        embedder: `minilm` or `hash`.
        similarity, top_fraction, min_hits, top, batch_size: see above.
    """

    name = "discovery"
    needs = Needs()

    def __init__(self, generator: str | None = None, embedder: str = "minilm", similarity: float = 0.8,
                 top_fraction: float = 0.1, min_hits: int = 2, top: int = 10, batch_size: int = 16):
        self.generator, self.embedder, self.similarity = generator, embedder, similarity
        self.top_fraction, self.min_hits, self.top, self.batch_size = top_fraction, min_hits, top, batch_size

    def descriptors(self, ctx: MethodContext, vocabulary: tuple[str, ...]) -> dict[int, list[str]]:
        data = ctx.data
        texts = data["text"] if "text" in data.column_names else [" ".join(w) for w in data["words"]]
        generator = ctx.proposer or self.generator
        if generator is None:  # the runner records "not applicable"
            raise NotImplementedError("discovery ties descriptors a generative LM proposes; this task provides "
                                      "no generator (ctx.proposer) and none was given (Discovery(generator=...))")
        completions, cost = propose(_proposer(generator, self.batch_size), texts, self.batch_size, progress=True)
        log.info("discovery: generation %s", cost)
        embed = _embedder(self.embedder)
        own = assign([normalise(c) for c in completions], vocabulary, embed(list(vocabulary)), embed,
                     self.similarity)
        col = {d: i for i, d in enumerate(vocabulary)}
        present = np.zeros((len(texts), len(vocabulary)), dtype=bool)
        for s, descs in enumerate(own):
            present[s, [col[d] for d in descs]] = True
        words, index, out = word_activations(ctx), ctx.index, {}
        n_words = [len(w) for w in data["words"]]
        for site in index.sites:
            acts = sentence_means(np.asarray(words.acts[site]), words.kept, n_words)
            score = enrichment(acts, present, self.top_fraction, self.min_hits)  # (N, V)
            order = np.argsort(-score, axis=1, kind="stable")[:, :self.top]
            for i, (row, idx) in enumerate(zip(score, order)):
                out[index.offset(site) + i] = [vocabulary[v] for v in idx if np.isfinite(row[v])]
        return out
