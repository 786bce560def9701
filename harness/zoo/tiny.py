"""Tiny randomly initialised models and tokenizers built from configs, for tests and `--quick` runs."""
from __future__ import annotations

import torch

from ..engine.models import LoadedModel, prepare_tokenizer

TINY_ARCHS = ("bert", "gpt2", "gpt_neox", "llama")
_ENCODERS = ("bert", "roberta", "distilbert", "electra")

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


def _family_kwargs(layers: int, hidden: int, ffn: int) -> dict[str, tuple[str, dict]]:
    """Family -> (config class name, its size arguments), for `tiny_config`."""
    std = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=2,
               max_position_embeddings=128)
    dec = dict(std, num_key_value_heads=2, bos_token_id=2, eos_token_id=3)
    gpt = dict(n_layer=layers, n_embd=hidden, n_inner=ffn, n_head=2, n_positions=128, bos_token_id=2, eos_token_id=3)
    return {
        "bert": ("BertConfig", std), "roberta": ("RobertaConfig", std), "electra": ("ElectraConfig", std),
        "distilbert": ("DistilBertConfig", dict(n_layers=layers, dim=hidden, hidden_dim=ffn, n_heads=2,
                                                max_position_embeddings=128)),
        "gpt2": ("GPT2Config", gpt), "gptj": ("GPTJConfig", dict(gpt, rotary_dim=8)),
        "gpt_neox": ("GPTNeoXConfig", dict(std, bos_token_id=2, eos_token_id=3)),
        "opt": ("OPTConfig", dict(num_hidden_layers=layers, hidden_size=hidden, ffn_dim=ffn, num_attention_heads=2,
                                  max_position_embeddings=128, word_embed_proj_dim=hidden, bos_token_id=2,
                                  eos_token_id=3)),
        "llama": ("LlamaConfig", dec), "mistral": ("MistralConfig", dec), "qwen2": ("Qwen2Config", dec),
        "qwen3": ("Qwen3Config", dict(dec, head_dim=hidden // 2)), "gemma": ("GemmaConfig", dict(dec, head_dim=hidden // 2)),
        "gemma2": ("Gemma2Config", dict(dec, head_dim=hidden // 2)),
        "gemma3_text": ("Gemma3TextConfig", dict(dec, head_dim=hidden // 2)),
        "phi3": ("Phi3Config", dec), "olmo": ("OlmoConfig", dec), "olmo2": ("Olmo2Config", dec),
        "falcon": ("FalconConfig", dict(num_hidden_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                                        num_attention_heads=2, bos_token_id=2, eos_token_id=3)),
        "stablelm": ("StableLmConfig", dec),
    }


# Every family `tiny_config` builds: the encoder and decoder families transformers ships with a
# standard (plain or gated) MLP. The harness's own tests run on TINY_ARCHS; the families test
# (tests/harness/engine/test_families.py) runs site resolution, hooks and ablation on all of them.
TINY_FAMILIES = tuple(_family_kwargs(1, 8, 16))


def tiny_config(arch: str, vocab_size: int, layers: int = 2, hidden: int = 32, ffn: int = 64,
                num_labels: int = 2):
    """A small config of `arch` (one of TINY_FAMILIES)."""
    import transformers as tf

    table = _family_kwargs(layers, hidden, ffn)
    if arch not in table:
        raise ValueError(f"no tiny config for {arch!r}; use one of {TINY_FAMILIES}")
    cls, kwargs = table[arch]
    return getattr(tf, cls)(vocab_size=vocab_size, num_labels=num_labels, pad_token_id=0, **kwargs)


def tiny_model(arch: str = "bert", kind: str = "base", seed: int = 0, tokenizer=None,
               **config_kwargs) -> LoadedModel:
    """A randomly initialised tiny model of `arch`, seeded, as a LoadedModel.

    Args:
        arch: one of TINY_FAMILIES (TINY_ARCHS are the ones the harness's own tests use).
        kind: `base`, `causal-lm` or `classifier`.
        seed: initialisation seed.
        tokenizer: defaults to `tiny_tokenizer()` ([CLS]/[SEP] for the encoder families only).
        **config_kwargs: passed to `tiny_config` (layers, hidden, ffn, num_labels).
    """
    import transformers as tf

    tokenizer = tokenizer or tiny_tokenizer(cls_sep=arch in _ENCODERS)
    config = tiny_config(arch, len(tokenizer), **config_kwargs)
    auto = {"base": tf.AutoModel, "causal-lm": tf.AutoModelForCausalLM,
            "classifier": tf.AutoModelForSequenceClassification}[kind]
    torch.manual_seed(seed)
    model = auto.from_config(config).eval()
    return LoadedModel(model, tokenizer, f"tiny-{arch}-{kind}-s{seed}", "<config>", kind)
