"""The `probe` task's fixed probe and its control task: one recipe (multinomial logistic
regression, zero init, full-batch L-BFGS) trained for every method on the same standardised
word activations, and a control tag per word type (Hewitt & Liang 2019)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- control task

def tag_distribution(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes,) share of each tag among the tokens `labels`."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("no labelled word to take the control tag distribution from")
    return counts / counts.sum()


def control_tags(words, probs: np.ndarray, seed: int) -> np.ndarray:
    """A control tag per word: a function of the word's type (its exact string) and `seed` only.

    Each type hashes (sha256 of seed and word) to a uniform number in [0, 1), mapped through the
    inverse CDF of `probs`, so types draw tags independently from `probs`.
    """
    types, inverse = np.unique(np.asarray(words, dtype=object).astype(str), return_inverse=True)
    cdf = np.cumsum(probs)
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}\x00{w}".encode()).digest()[:8], "little") / 2.0 ** 64
                  for w in types])
    tags = np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1)
    return tags[inverse.reshape(-1)].astype(np.int64)


# --------------------------------------------------------------------------- the probe

def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, steps: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (d, C), b (C,)) of multinomial logistic regression: cross-entropy + l2 * sum W^2,
    zero init, full-batch L-BFGS for at most `steps` iterations."""
    weight = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


@dataclass(frozen=True)
class ProbeData:
    """Standardised word activations and labels of the probe-train and the scored test words.

    Attributes:
        x_train, x_test: (W, N) float32 on the CPU, all resid neurons in `ctx.index` order.
        y_train, y_test: {"task": gold tags, "control": control tags}, (W,) int64 each.
        sentence: (W_test,) position of each test word's sentence among the scored sentences.
        test_rows: ids (rows of the test split) of the scored sentences.
        n_classes: number of tags.
    """

    x_train: torch.Tensor
    y_train: dict[str, torch.Tensor]
    x_test: torch.Tensor
    y_test: dict[str, np.ndarray]
    sentence: np.ndarray
    test_rows: np.ndarray
    n_classes: int

    @property
    def words_per_sentence(self) -> np.ndarray:
        return np.bincount(self.sentence, minlength=len(self.test_rows)).astype(np.float64)


def correct_counts(data: ProbeData, columns: np.ndarray, labels: str, l2: float, steps: int) -> np.ndarray:
    """(n_sentences,) test words per scored sentence a probe on `columns` tags right (`labels`:
    task or control)."""
    cols = torch.as_tensor(columns, dtype=torch.long)
    weight, bias = fit_probe(data.x_train.index_select(1, cols), data.y_train[labels], data.n_classes,
                             l2, steps)
    pred = (data.x_test.index_select(1, cols) @ weight + bias).argmax(1).numpy()
    right = (pred == data.y_test[labels]).astype(np.float64)
    return np.bincount(data.sentence, weights=right, minlength=len(data.test_rows))
