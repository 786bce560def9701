"""NeuronBench's metrics as Hugging Face `evaluate` modules, loadable from a local path (no hub):
`evaluate.load(module_dir("neuron_precision_at_k"))`. The tasks score through them (`load`)."""
from __future__ import annotations

import functools
from pathlib import Path

MODULES = ("neuron_precision_at_k", "neuron_description")


def module_dir(name: str) -> str:
    """The folder of module `name`, to pass to `evaluate.load`.

    Raises:
        KeyError: an unknown module, naming the ones there are.
    """
    if name not in MODULES:
        raise KeyError(f"no evaluate module {name!r}; NeuronBench ships {', '.join(MODULES)}")
    return str(Path(__file__).parent / name)


@functools.lru_cache(maxsize=None)
def load(name: str):
    """`evaluate.load` of module `name` from its local folder (once per process)."""
    import evaluate

    return evaluate.load(module_dir(name))
