"""Descriptor discovery (SEEDS.md section 3): a generative LM proposes short descriptors for each
sentence, the proposals are normalised and clustered by sentence embedding into a vocabulary, and
each sentence's proposals are mapped onto that vocabulary. Generation is cached on disk.

The generator is prompted with a few-shot completion ("Sentence: ... / Topics: ..." three times,
then the target): a chat template makes SmolLM2-135M-Instruct mostly echo the sentence
(RESOURCES.md). Decoding is batched greedy generation, prompts sorted by length.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from .cache import content_hash
from .paths import atomic_write_json, cache_dir

log = logging.getLogger(__name__)

SHOTS = (("the acting is superb and the story is moving .", "acting, praise"),
         ("a dull , lifeless thriller with no scares .", "thriller, boredom"),
         ("the kids will love the talking animals .", "family, animals"))
_SPLIT = re.compile(r"[,;/]|\band\b")
_STRIP = re.compile(r"[^a-z0-9' -]+")
_JUNK = {"sentence", "topics", "topic", ""}


def few_shot_prompt(text: str, shots: Sequence[tuple[str, str]] = SHOTS) -> str:
    """The completion prompt whose continuation lists the topics of `text`."""
    return "".join(f"Sentence: {s}\nTopics: {t}\n\n" for s, t in shots) + f"Sentence: {text}\nTopics:"


class Proposer(Protocol):
    """Proposes raw descriptor text for sentences; `key` identifies it for the cache."""

    key: str

    def complete(self, texts: list[str]) -> list[str]:
        """One raw completion (e.g. " comedy, praise") per text."""
        ...


@dataclass
class LMProposer:
    """Greedy few-shot completion with a causal LM (`LoadedModel`), `batch_size` prompts at a time.

    Attributes:
        model: the generator (e.g. `load_model("smollm2-135m")`).
        max_new_tokens: tokens generated per sentence (the first line is kept).
        batch_size: prompts per `generate` call (sorted by length, left-padded).
    """

    model: object
    max_new_tokens: int = 8
    batch_size: int = 16
    shots: tuple[tuple[str, str], ...] = SHOTS
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = content_hash({"generator": self.model.fingerprint(), "shots": self.shots,
                                 "max_new_tokens": self.max_new_tokens, "decoding": "greedy"})

    @torch.no_grad()
    def complete(self, texts: list[str]) -> list[str]:
        tok, net = self.model.tokenizer, self.model.model
        side, tok.padding_side = tok.padding_side, "left"  # generation continues at the right edge
        try:
            prompts = [few_shot_prompt(t, self.shots) for t in texts]
            enc = tok(prompts, return_tensors="pt", padding=True).to(self.model.device)
            out = net.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                               pad_token_id=tok.pad_token_id)
        finally:
            tok.padding_side = side
        return [tok.decode(row, skip_special_tokens=True) for row in out[:, enc["input_ids"].shape[1]:]]


# A fixed keyword lexicon: the stand-in generator of tests and `--quick` runs (no model, instant).
STUB_LEXICON = {
    "praise": ("good", "great", "best", "wonderful", "superb", "fine", "beautiful", "fun", "moving"),
    "criticism": ("bad", "dull", "boring", "worst", "mess", "tedious", "flat", "fails", "stupid"),
    "comedy": ("funny", "comedy", "laugh", "laughs", "humor", "comic", "jokes", "hilarious"),
    "acting": ("acting", "actor", "actors", "performance", "performances", "cast", "role"),
    "story": ("story", "plot", "script", "screenplay", "narrative", "characters", "tale"),
    "direction": ("director", "directed", "direction", "filmmaker", "filmmakers"),
    "family": ("family", "kids", "children", "father", "mother", "child"),
    "emotion": ("love", "heart", "emotional", "sad", "life", "feel", "feeling"),
}


@dataclass
class StubProposer:
    """Keyword topics (`STUB_LEXICON`); "film" when none matches. For tests and `--quick` only."""

    key: str = "stub-lexicon-v1"

    def complete(self, texts: list[str]) -> list[str]:
        out = []
        for text in texts:
            words = set(text.lower().split())
            found = [topic for topic, cues in STUB_LEXICON.items() if words & set(cues)]
            out.append(" " + ", ".join(found or ["film"]))
        return out


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def propose(proposer: Proposer, texts: Sequence[str], batch_size: int = 16,
            cache_root: Path | None = None, progress: bool = False) -> tuple[list[str], dict]:
    """Raw completions of `texts`, generated once per (proposer, text) and cached on disk.

    The cache is one JSON file per proposer key under `<cache>/generated/`, rewritten atomically
    after every batch, so an interrupted run keeps what it generated.

    Returns:
        The completions (in `texts` order) and a cost record: `generated` (texts generated now),
        `cached`, `seconds` (generation wall time), `seconds_per_text`.
    """
    path = (cache_root or cache_dir()) / "generated" / f"{proposer.key}.json"
    store: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
    todo = sorted({t for t in texts if _text_key(t) not in store}, key=len)
    start = time.perf_counter()
    for s in range(0, len(todo), batch_size):
        batch = todo[s:s + batch_size]
        store.update({_text_key(t): c for t, c in zip(batch, proposer.complete(batch))})
        atomic_write_json(path, store)
        if progress:
            log.info("generated %d/%d texts (%.0f s)", s + len(batch), len(todo), time.perf_counter() - start)
    seconds = time.perf_counter() - start
    cost = {"generated": len(todo), "cached": len(set(texts)) - len(todo), "seconds": round(seconds, 2),
            "seconds_per_text": round(seconds / len(todo), 3) if todo else None}
    return [store[_text_key(t)] for t in texts], cost


def sentence_means(values: np.ndarray, kept: np.ndarray, n_words) -> np.ndarray:
    """(S, ...) mean over each sentence's kept words of the word rows `values` (W, ...).

    A word-level matrix becomes a sentence-level one: `n_words[s]` consecutive rows belong to
    sentence s; rows with `kept` False (no token) are left out.

    Raises:
        ValueError: a sentence has no kept word.
    """
    sentence = np.repeat(np.arange(len(n_words)), n_words)[kept]
    counts = np.bincount(sentence, minlength=len(n_words))
    if (counts == 0).any():
        raise ValueError(f"sentences {np.flatnonzero(counts == 0)[:5].tolist()} have no kept word")
    sums = np.zeros((len(n_words), *values.shape[1:]), dtype=np.float64)
    np.add.at(sums, sentence, np.asarray(values[kept], dtype=np.float64))
    return sums / counts.reshape(-1, *([1] * (values.ndim - 1)))


def normalise(completion: str, max_words: int = 3) -> list[str]:
    """The distinct descriptors of one completion: its first line, split at commas (and `and`,
    `;`, `/`), lower-cased, stripped of other punctuation, at most `max_words` words each; the
    prompt's own field names and repeats are dropped."""
    line = completion.strip().split("\n")[0].lower()
    out: list[str] = []
    for part in _SPLIT.split(line):
        term = " ".join(_STRIP.sub(" ", part).split())
        if term not in _JUNK and len(term.split()) <= max_words and term not in out:
            out.append(term)
    return out


# --------------------------------------------------------------------------- embedding and clustering

Embedder = Callable[[list[str]], np.ndarray]  # texts -> (n, d) unit-norm rows


def minilm_embedder(model=None, batch_size: int = 64):
    """Mean-pooled, L2-normalised sentence embeddings from the packaged MiniLM (or `model`)."""
    from .models import load_model

    lm = model or load_model("minilm", kind="base", device="cpu")

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        rows = []
        for s in range(0, len(texts), batch_size):
            enc = lm.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=32,
                               return_tensors="pt").to(lm.device)
            hidden = lm.model(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(rows).cpu().numpy() if rows else np.zeros((0, lm.config.hidden_size))
    return embed


def hash_embedder(dim: int = 256):
    """Character-trigram hashing embeddings (unit norm): a model-free stand-in for tests and stubs."""
    def embed(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), dim))
        for i, t in enumerate(texts):
            padded = f"  {t} "
            for j in range(len(padded) - 2):
                out[i, int(hashlib.md5(padded[j:j + 3].encode()).hexdigest()[:8], 16) % dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return embed


@dataclass(frozen=True)
class Vocabulary:
    """Clusters of proposed descriptors: `names[c]` (the cluster's most frequent term) and the unit
    embedding of that name, `centres[c]`; `members[c]` lists the terms it absorbed, `support[c]`
    the number of sentences that proposed one of them."""

    names: tuple[str, ...]
    centres: np.ndarray
    members: tuple[tuple[str, ...], ...]
    support: tuple[int, ...]


def cluster(term_lists: Sequence[Sequence[str]], embed, threshold: float = 0.8, min_support: int = 5,
            max_size: int = 60) -> Vocabulary:
    """Cluster the normalised proposals of a discovery split into a vocabulary.

    Terms are taken by decreasing sentence count (ties alphabetically); each joins the existing
    cluster whose name embedding is most similar to its own if the cosine similarity reaches
    `threshold`, else it founds a cluster named after itself. Clusters proposed for fewer than
    `min_support` sentences are dropped; at most `max_size` clusters are kept, the best supported.
    """
    counts = Counter(t for terms in term_lists for t in set(terms))
    terms = sorted(counts, key=lambda t: (-counts[t], t))
    vectors = embed(terms) if terms else np.zeros((0, 1))
    leaders: list[int] = []
    assigned: dict[str, int] = {}
    for i, term in enumerate(terms):
        sims = vectors[leaders] @ vectors[i] if leaders else np.zeros(0)
        if len(sims) and sims.max() >= threshold:
            assigned[term] = int(np.argmax(sims))
        else:
            assigned[term] = len(leaders)
            leaders.append(i)
    support = [0] * len(leaders)
    for terms_ in term_lists:
        for c in {assigned[t] for t in terms_}:
            support[c] += 1
    keep = sorted((c for c in range(len(leaders)) if support[c] >= min_support),
                  key=lambda c: (-support[c], terms[leaders[c]]))[:max_size]
    members = [tuple(t for t in terms if assigned[t] == c) for c in keep]
    return Vocabulary(tuple(terms[leaders[c]] for c in keep), vectors[[leaders[c] for c in keep]],
                      tuple(members), tuple(support[c] for c in keep))


def assign(term_lists: Sequence[Sequence[str]], names: Sequence[str], centres: np.ndarray, embed,
           threshold: float = 0.8) -> list[list[str]]:
    """Per sentence, the vocabulary names its terms map to: each term goes to the most similar
    name (unit embeddings `centres`) when the cosine similarity reaches `threshold`, else nowhere."""
    unique = sorted({t for terms in term_lists for t in terms})
    if not unique or not len(names):
        return [[] for _ in term_lists]
    sims = embed(unique) @ np.asarray(centres).T  # (terms, V)
    best = {t: (names[int(np.argmax(row))] if row.max() >= threshold else None) for t, row in zip(unique, sims)}
    out = []
    for terms in term_lists:
        mapped = [best[t] for t in terms if best[t] is not None]
        out.append(sorted(set(mapped), key=mapped.index))
    return out


def make_proposer(name: str, batch_size: int = 16) -> Proposer:
    """`stub` (the keyword `StubProposer`) or a causal-LM alias / folder (an `LMProposer`)."""
    if name == "stub":
        return StubProposer()
    from .models import load_model

    return LMProposer(load_model(name, kind="causal-lm"), batch_size=batch_size)


def make_embedder(name: str):
    """`minilm` (the packaged MiniLM, mean-pooled) or `hash` (character trigrams, no model)."""
    if name == "hash":
        return hash_embedder()
    if name == "minilm":
        return minilm_embedder()
    raise ValueError(f"embedder {name!r}: use 'minilm' or 'hash'")
