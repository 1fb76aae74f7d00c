"""Top-k accuracy as an `evaluate` metric module (shipped with st3_hf, so it loads offline)."""
import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Top-k accuracy: the fraction of examples whose label is among the k highest-scoring
classes. `predictions` are, per example, the class indices sorted by decreasing score
(at least max(k) of them); `references` are the labels."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): class indices ranked by score, best first.
    references (list of int): true labels.
    k (list of int): the k values to report (default [1, 5]).
Returns:
    dict with "top{k}" for each k, as fractions in [0, 1].
Example:
    >>> metric = evaluate.load("st3_hf/train/metrics/topk_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=[1, 2])
    {'top1': 0.5, 'top2': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=(1, 5)):
        ranked = np.asarray(predictions)
        labels = np.asarray(references)[:, None]
        out = {}
        for kk in k:
            kk = int(kk)
            if ranked.shape[1] < kk:
                raise ValueError(f"top{kk} needs at least {kk} ranked predictions per example, got {ranked.shape[1]}")
            out[f"top{kk}"] = float((ranked[:, :kk] == labels).any(axis=1).mean())
        return out
