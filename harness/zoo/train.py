"""The zoo's two builders: fine-tune a sentence classifier (beside a frozen-feature probe baseline)
and train a small causal LM from scratch, saving a trajectory of checkpoints. `zoo` calls them."""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from ..engine import data
from ..engine.catalogue import step_dir
from ..engine.recipes import ClassifierHP, TrajectoryHP
from ..engine.models import default_device, prepare_tokenizer, resolve

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """What a builder reports to the zoo: metrics, the data split record, the final step."""

    metrics: dict
    data: dict
    step: int


# --------------------------------------------------------------------------- shared pieces

def _warmup_then(total: int, warmup: int, decay: str) -> Callable[[int], float]:
    def factor(step: int) -> float:  # LambdaLR calls this with the number of steps taken
        if step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1 - frac if decay == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return factor


def _optimizer(model, lr: float, weight_decay: float, total: int, warmup: int, decay: str):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _warmup_then(total, warmup, decay))


def _step(model, opt, sched, loss: torch.Tensor, max_grad_norm: float) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _batches(ids: list[list[int]], order, batch_size: int, pad_id: int,
             device) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(indices, input_ids, attention_mask) batches, padded to the longest row of each batch."""
    order = np.asarray(order)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        rows = [torch.tensor(ids[i]) for i in idx]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)
        mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        yield idx, input_ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- classifier

def build_classifier(hp: ClassifierHP, out: Path, progress: bool = True) -> BuildResult:
    """Fine-tune `hp.init` on `hp.data` and save it (weights and tokenizer) into `out`.

    Before fine-tuning, a logistic-regression probe on the frozen encoder's mean-pooled features
    is fitted as the baseline the classifier must beat.
    """
    corpus = data.load(hp.data, seed=hp.seed)
    if corpus.kind != "sentence":
        raise ValueError(f"classifier data {hp.data!r} is of kind {corpus.kind!r}, not 'sentence'")
    splits = {k: corpus.splits[k] if hp.limit is None else data.subsample(corpus.splits[k], hp.limit, hp.seed)
              for k in data.SPLITS}
    torch.manual_seed(hp.seed)
    tokenizer, model = _init_classifier(hp, corpus.label_names, list(splits["train"]["text"]))
    device = default_device()
    model.to(device)
    enc = {k: (tokenizer(list(ds["text"]), truncation=True, max_length=hp.max_length)["input_ids"],
               torch.tensor(ds["label"])) for k, ds in splits.items()}
    pad = tokenizer.pad_token_id
    metrics = probe_baseline(model.base_model, enc, pad, hp.probe_l2, device)
    history, best_step = _fine_tune(model, enc, pad, hp, device, progress)
    best = max(history, key=lambda h: h["dev_accuracy"])  # the first of equals: earlier epoch
    metrics.update(dev_accuracy=best["dev_accuracy"], best_epoch=best["epoch"], epochs=history,
                   test_accuracy=_accuracy(model, *enc["test"], pad, device))
    _save(model, tokenizer, out)
    record = corpus.split_record()
    if hp.limit is not None:
        record["used"] = {k: len(v) for k, v in splits.items()}
    return BuildResult(metrics, record, best_step)


def _init_classifier(hp: ClassifierHP, label_names, train_texts: list[str]):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    labels = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)})
    if hp.init == "tiny-bert":
        from .tiny import tiny_config

        # Not tiny.tiny_tokenizer: tokenizers' WordPiece trainer breaks frequency ties in hash
        # order, so its vocabulary (and every metric after it) changes from run to run.
        tokenizer = word_tokenizer(train_texts, hp.max_length, bert=True, max_words=300)
        config = tiny_config("bert", len(tokenizer), num_labels=len(label_names))
        config.update({k: v for k, v in labels.items() if k != "num_labels"})
        return tokenizer, AutoModelForSequenceClassification.from_config(config)
    folder = resolve(hp.init)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    return tokenizer, AutoModelForSequenceClassification.from_pretrained(folder, **labels)


def _fine_tune(model, enc, pad: int, hp: ClassifierHP, device, progress: bool) -> tuple[list[dict], int]:
    """Train for `hp.epochs`, leaving the model at its best dev epoch; returns per-epoch history
    and the step count at that epoch."""
    ids, labels = enc["train"]
    per_epoch = math.ceil(len(ids) / hp.batch_size)
    total = per_epoch * hp.epochs
    opt, sched = _optimizer(model, hp.lr, hp.weight_decay, total, round(hp.warmup_frac * total), "linear")
    history: list[dict] = []
    best_state, best_acc, best_step = None, -1.0, 0
    with tqdm(total=total, desc="fine-tune", unit="step", disable=not progress) as bar:
        for epoch in range(hp.epochs):
            model.train()
            order = np.random.default_rng([hp.seed, epoch]).permutation(len(ids))
            losses = []
            for idx, input_ids, mask in _batches(ids, order, hp.batch_size, pad, device):
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels[idx].to(device)).loss
                _step(model, opt, sched, loss, hp.max_grad_norm)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-20:]):.3f}")
            acc = _accuracy(model, *enc["dev"], pad, device)
            history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_accuracy": acc})
            log.info("epoch %d: train loss %.4f, dev accuracy %.4f", epoch + 1, history[-1]["train_loss"], acc)
            if acc > best_acc:
                best_acc, best_step = acc, (epoch + 1) * per_epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return history, best_step


@torch.no_grad()
def _accuracy(model, ids: list[list[int]], labels: torch.Tensor, pad: int, device) -> float:
    model.eval()
    preds = [model(input_ids=x, attention_mask=m).logits.argmax(-1).cpu()
             for _, x, m in _batches(ids, range(len(ids)), 128, pad, device)]
    return float((torch.cat(preds) == labels).float().mean())


@torch.no_grad()
def _mean_pooled(encoder, ids: list[list[int]], pad: int, device) -> torch.Tensor:
    encoder.eval()
    feats = []
    for _, x, mask in _batches(ids, range(len(ids)), 128, pad, device):
        h_BTH = encoder(input_ids=x, attention_mask=mask).last_hidden_state
        m_BT1 = mask.unsqueeze(-1).to(h_BTH.dtype)
        feats.append(((h_BTH * m_BT1).sum(1) / m_BT1.sum(1)).float().cpu())
    return torch.cat(feats)  # (N, H)


def probe_baseline(encoder, enc: dict, pad: int, l2s: tuple[float, ...], device) -> dict:
    """Logistic regression on the frozen encoder's mean-pooled, standardised features.

    Fitted on train for each L2 strength in `l2s`; the one with the best dev accuracy is kept.

    Returns:
        `probe_dev_accuracy`, `probe_test_accuracy` and the chosen `probe_l2`.
    """
    X = {k: _mean_pooled(encoder, ids, pad, device) for k, (ids, _) in enc.items()}
    mu, sd = X["train"].mean(0), X["train"].std(0) + 1e-6
    X = {k: (v - mu) / sd for k, v in X.items()}
    y = {k: labels for k, (_, labels) in enc.items()}
    n_classes = int(max(int(v.max()) for v in y.values())) + 1
    fits = []
    for l2 in l2s:
        W = _fit_logreg(X["train"], y["train"], l2, n_classes)
        fits.append((_probe_acc(W, X["dev"], y["dev"]), l2, W))
    dev_acc, l2, W = max(fits, key=lambda f: f[0])
    return {"probe_dev_accuracy": dev_acc, "probe_test_accuracy": _probe_acc(W, X["test"], y["test"]),
            "probe_l2": l2}


def _fit_logreg(X: torch.Tensor, y: torch.Tensor, l2: float, n_classes: int) -> torch.Tensor:
    X1 = torch.cat([X, torch.ones(len(X), 1)], 1)  # bias column, left out of the penalty
    W = torch.zeros(X1.shape[1], n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X1 @ W, y) + l2 * W[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach()


def _probe_acc(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> float:
    logits = torch.cat([X, torch.ones(len(X), 1)], 1) @ W
    return float((logits.argmax(-1) == y).float().mean())


# --------------------------------------------------------------------------- trajectory

def word_tokenizer(lines: list[str], max_length: int, bert: bool = False, max_words: int | None = None):
    """A fast word-level tokenizer over the words of `lines`, the same on every run.

    Ids: the special tokens first, then words by decreasing count (ties alphabetical).
    Language-model style (default): <pad>, <eos>, <unk>; words are split on whitespace alone, so
    PTB's `<unk>` and `n't` stay whole and `<unk>` is both a word of the text and the unknown
    token. BERT style (`bert=True`): [PAD], [UNK], [CLS], [SEP]; lower-cased, punctuation split
    off, every sequence wrapped in [CLS] ... [SEP].

    Args:
        lines: the training text.
        max_length: the tokenizer's model_max_length.
        bert: BERT style instead of language-model style.
        max_words: keep only this many most frequent words; None keeps all.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if bert else ("<pad>", "<eos>", "<unk>")
    pre = pre_tokenizers.Whitespace() if bert else pre_tokenizers.WhitespaceSplit()
    norm = normalizers.Lowercase() if bert else None
    counts = Counter(w for line in lines for w, _ in pre.pre_tokenize_str(norm.normalize_str(line) if norm else line))
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0])) if w not in specials]
    vocab = {w: i for i, w in enumerate((*specials, *words[:max_words]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[1 if bert else 2]))
    tok.pre_tokenizer = pre
    if bert:
        tok.normalizer = norm
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        names = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **names))


def token_stream(tokenizer, lines: list[str]) -> torch.Tensor:
    """All lines' token ids, each line followed by <eos>, as one 1-D tensor."""
    from tokenizers import Tokenizer

    eos = tokenizer.eos_token_id
    # The backend, not `tokenizer(...)`: lines longer than model_max_length are fine in a stream. A
    # copy without truncation or padding: a call with `truncation=True` (the collector's) leaves them
    # set on the shared backend, and the stream would silently cut every line at max_length.
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    rows = backend.encode_batch(lines, add_special_tokens=False)
    return torch.tensor([t for row in rows for t in (*row.ids, eos)], dtype=torch.long)


def build_trajectory(hp: TrajectoryHP, out: Path, progress: bool = True) -> BuildResult:
    """Train a GPT-2 from scratch on `hp.data`, saving a model folder at every checkpoint step.

    Each `step_dir(out, step)` holds the weights, the tokenizer and a manifest.json with the step,
    its validation perplexity and the recent train loss.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = data.load(hp.data, seed=hp.seed)
    if corpus.kind != "lm":
        raise ValueError(f"trajectory data {hp.data!r} is of kind {corpus.kind!r}, not 'lm'")
    lines = corpus.texts("train")[: hp.train_lines]
    tokenizer = word_tokenizer([*lines, *hp.extra_words()], hp.seq_len)
    train = token_stream(tokenizer, lines)
    chunks_NL = train[: len(train) // hp.seq_len * hp.seq_len].view(-1, hp.seq_len)
    valid = token_stream(tokenizer, corpus.texts("dev"))[: hp.eval_tokens]
    torch.manual_seed(hp.seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=hp.seq_len, n_embd=hp.n_embd,
                        n_layer=hp.n_layer, n_head=hp.n_head, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = default_device()
    model = GPT2LMHeadModel(config).to(device)
    steps = hp.checkpoints[-1]
    opt, sched = _optimizer(model, hp.lr, hp.weight_decay, steps, hp.warmup_steps, "cosine")
    order = _chunk_order(len(chunks_NL), hp.batch_size, steps, hp.seed)
    points, losses = [], []
    model.train()
    for step in tqdm(range(1, steps + 1), desc="train LM", unit="step", disable=not progress):
        x = hp.train_batch(step, chunks_NL[order[step - 1]], tokenizer).to(device)
        loss = lm_loss(model, x, "mean")
        _step(model, opt, sched, loss, hp.max_grad_norm)
        losses.append(loss.item())
        if step in hp.checkpoints:
            point = {"step": step, "valid_ppl": perplexity(model, valid, hp.seq_len, device),
                     "train_loss": float(np.mean(losses[-10:]))}
            _save_checkpoint(model, tokenizer, step_dir(out, step), point)
            points.append(point)
            log.info("step %d: valid ppl %.1f", step, point["valid_ppl"])
            model.train()
    metrics = {"checkpoints": points, "final_valid_ppl": points[-1]["valid_ppl"],
               "vocab_size": len(tokenizer), "train_tokens": int(chunks_NL.numel()),
               "eval_tokens": int(len(valid)), "parameters": sum(p.numel() for p in model.parameters())}
    return BuildResult(metrics, corpus.split_record(), steps)


def _chunk_order(n_chunks: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) chunk indices: seeded permutations, one an epoch, read in order."""
    need = steps * batch_size
    perms = [np.random.default_rng([seed, e]).permutation(n_chunks) for e in range(-(-need // n_chunks))]
    return np.concatenate(perms)[:need].reshape(steps, batch_size)


def _save_checkpoint(model, tokenizer, folder: Path, point: dict) -> None:
    import json

    _save(model, tokenizer, folder)
    (folder / "manifest.json").write_text(json.dumps(point, indent=2, sort_keys=True) + "\n")


def _save(model, tokenizer, folder: Path) -> None:
    from transformers.utils import logging as tf_logging

    # save_pretrained draws its own bar per shard; the zoo's bars are enough.
    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()
    if not (folder / "config.json").is_file():  # transformers writes weights on rank 0 alone, silently
        raise RuntimeError(f"{folder}: the model was not saved (under a launcher transformers saves on rank 0 "
                           "only); build zoo entries in one process: `neuronbench zoo build NAME`")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int, device, batch_size: int = 64) -> float:
    """exp(mean next-token loss) over non-overlapping `seq_len` blocks of the 1-D `ids`."""
    model.eval()
    blocks_NL = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    for s in range(0, len(blocks_NL), batch_size):
        x = blocks_NL[s:s + batch_size].to(device)
        total += lm_loss(model, x, "sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def lm_loss(model, x_BL: torch.Tensor, reduction: str) -> torch.Tensor:
    """Next-token cross-entropy of every position but the last."""
    logits_BLV = model(input_ids=x_BL).logits[:, :-1].float()
    return F.cross_entropy(logits_BLV.reshape(-1, logits_BLV.shape[-1]), x_BL[:, 1:].reshape(-1),
                           reduction=reduction)
