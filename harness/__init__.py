"""NeuronBench's engine: models, neuron sites, data, collectors, cache and interventions."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuronbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
