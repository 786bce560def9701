"""The engine, NeuronBench's ground floor: models and their neuron sites, data, collectors and
their cache, interventions, the method API, metrics and the zoo's catalogue (what the model loader
reads). It imports nothing from the floors above (`zoo`, `suite`, `cli`)."""

from . import zoo_family  # noqa: E402,F401  the catalogue's trajectory families register on import
