"""Top-k accuracy as an `evaluate` metric module (shipped with st3_hf, so it loads offline)."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-k accuracy: the fraction of examples whose label is among the k highest-scoring classes."""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): class indices ranked by score, best first (at least max(k) of them).
    references (list of int): true labels.
    k (list of int): the k values to report (default [1, 5]).
Returns:
    dict with "top{k}" for each k, as fractions in [0, 1].
Example:
    >>> metric = evaluate.load("st3_hf/train/metrics/topk_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=[1, 2])
    {'top1': 0.5, 'top2': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ranked, labels = np.asarray(predictions), np.asarray(references)[:, None]
        if ranked.shape[1] < max(k):
            raise ValueError(f"top{max(k)} needs {max(k)} ranked predictions per example, got {ranked.shape[1]}")
        return {f"top{int(kk)}": float((ranked[:, : int(kk)] == labels).any(axis=1).mean()) for kk in k}
