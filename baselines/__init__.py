"""Reference neuron-explanation methods, one file per method, all through the harness method API."""
