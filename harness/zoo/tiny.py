"""Tiny randomly initialised models and tokenizers built from configs, for tests and `--quick` runs."""
from __future__ import annotations

import torch

from ..engine.models import LoadedModel, prepare_tokenizer

TINY_ARCHS = ("bert", "gpt2", "gpt_neox", "llama")

_DEFAULT_TEXT = (
    "the cat sat on the mat . a dog was running in the park while the children were playing . "
    "stocks rallied sharply yesterday as investors bought shares of banking companies . "
    "this movie is wonderful and the acting is superb . the plot was boring and badly written . "
    "he quickly walked home , singing loudly and happily ."
)


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 80, cls_sep: bool = True):
    """A deterministic WordPiece tokenizer over `texts`, small enough that many words split.

    The vocabulary is the special tokens, every character (word-initial and `##` continuation)
    and the most frequent whole words (ties broken alphabetically) up to `vocab_size`; other words
    split into pieces. (The `tokenizers` trainer breaks frequency ties in hash order, so it is not
    used: the same text must always give the same tokenizer.)

    Args:
        texts: text to take words from; a fixed default paragraph when None.
        vocab_size: target vocabulary size (small values force subword splits).
        cls_sep: wrap every sequence in [CLS] ... [SEP] (BERT style).
    """
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for t in (texts or [_DEFAULT_TEXT]) for w in t.lower().split())
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + chars + [f"##{c}" for c in chars]
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in vocab:
            vocab.append(word)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")
    return prepare_tokenizer(fast)


def tiny_config(arch: str, vocab_size: int, layers: int = 2, hidden: int = 32, ffn: int = 64,
                num_labels: int = 2):
    """A small config of `arch` (one of TINY_ARCHS)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, num_labels=num_labels, pad_token_id=0)
    if arch == "bert":
        return tf.BertConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                             num_attention_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=layers, n_embd=hidden, n_inner=ffn, n_head=2, n_positions=128,
                             bos_token_id=2, eos_token_id=3, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                                num_attention_heads=2, max_position_embeddings=128,
                                bos_token_id=2, eos_token_id=3, **common)
    if arch == "llama":
        return tf.LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                              bos_token_id=2, eos_token_id=3, **common)
    raise ValueError(f"no tiny config for {arch!r}; use one of {TINY_ARCHS}")


def tiny_model(arch: str = "bert", kind: str = "base", seed: int = 0, tokenizer=None,
               **config_kwargs) -> LoadedModel:
    """A randomly initialised tiny model of `arch`, seeded, as a LoadedModel.

    Args:
        arch: one of TINY_ARCHS.
        kind: `base`, `causal-lm` or `classifier`.
        seed: initialisation seed.
        tokenizer: defaults to `tiny_tokenizer()` (with [CLS]/[SEP] only for BERT).
        **config_kwargs: passed to `tiny_config` (layers, hidden, ffn, num_labels).
    """
    import transformers as tf

    tokenizer = tokenizer or tiny_tokenizer(cls_sep=arch == "bert")
    config = tiny_config(arch, len(tokenizer), **config_kwargs)
    auto = {"base": tf.AutoModel, "causal-lm": tf.AutoModelForCausalLM,
            "classifier": tf.AutoModelForSequenceClassification}[kind]
    torch.manual_seed(seed)
    model = auto.from_config(config).eval()
    return LoadedModel(model, tokenizer, f"tiny-{arch}-{kind}-s{seed}", "<config>", kind)
