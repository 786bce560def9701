"""NeuronBench's harness, in floors: `engine` (models, sites, data, collectors, cache, interventions,
the method API), `zoo` (the model builders), `suite` (tasks, runner, checks, report) and `cli`.
This package itself holds only `__version__`, which every floor may read."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuronbench")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
