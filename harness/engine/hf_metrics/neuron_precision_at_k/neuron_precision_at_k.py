"""Precision@k and recall@k of ranked descriptor lists against true descriptor sets (NeuronBench).

P@k = |top-k & truth| / k and R@k = |top-k & truth| / |truth| per item (SEEDS.md section 3: the
neuron-descriptor paper does not publish its formulas), averaged over items with a non-empty truth.
"""
import datasets
import evaluate

from neuronbench.harness.engine.metrics import precision_recall_at_k

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions: per item (neuron), its descriptors ranked best first (list of str).
    references: per item, its true descriptors (list of str; items with none are skipped).
    k: the cut-off (default 2).
Returns:
    precision@k, recall@k: means over items with a non-empty truth;
    per_item_precision, per_item_recall: the per-item values (for intervals); n_items.
Example:
    >>> m = evaluate.load(neuronbench.harness.engine.hf_metrics.module_dir("neuron_precision_at_k"))
    >>> m.compute(predictions=[["a", "b"]], references=[["b"]], k=2)["precision@k"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class NeuronPrecisionAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references, k=2):
        pairs = [precision_recall_at_k(list(p), set(r), int(k)) for p, r in zip(predictions, references) if r]
        prec, rec = [p for p, _ in pairs], [r for _, r in pairs]
        mean = (lambda v: sum(v) / len(v) if v else 0.0)
        return {"precision@k": mean(prec), "recall@k": mean(rec), "per_item_precision": prec,
                "per_item_recall": rec, "n_items": len(pairs)}
