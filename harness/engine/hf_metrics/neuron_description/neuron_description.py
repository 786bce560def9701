"""How well a descriptor's presence describes a neuron's activations (NeuronBench; the metrics of
NeuronEval, Oikarinen et al., ICML 2025): correlation, AUPRC, F1 and IoU (the neuron read as
active on its top `active_fraction` of inputs), plus precision and recall, which fail NeuronEval's
extra- and missing-label sanity tests and are only controls.
"""
import datasets
import evaluate

from neuronbench.harness.engine.description import ACTIVE_FRACTION, METRICS

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: per item (neuron x descriptor pair), the neuron's activation on each input.
    references: per item, 1 where the descriptor is present on that input, else 0 (same length).
    metrics: names among correlation, auprc, f1, iou, precision, recall (default the first four).
    active_fraction: share of inputs on which the neuron counts as active (F1, IoU, precision, recall).
Returns:
    per metric, the mean over items and `per_item_<metric>` (the per-item values); n_items.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class NeuronDescription(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32")),
                                        "references": datasets.Sequence(datasets.Value("int8"))}))

    def _compute(self, predictions, references, metrics=("correlation", "auprc", "f1", "iou"),
                 active_fraction=ACTIVE_FRACTION):
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown description metrics {unknown}; choose from {sorted(METRICS)}")
        out = {"n_items": len(predictions)}
        for name in metrics:
            values = [METRICS[name](p, r, active_fraction) for p, r in zip(predictions, references)]
            out[name] = sum(values) / len(values) if values else 0.0
            out[f"per_item_{name}"] = values
        return out
