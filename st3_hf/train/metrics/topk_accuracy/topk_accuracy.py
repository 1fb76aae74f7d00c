"""Top-k accuracy as an `evaluate` metric module (shipped with st3_hf, so it loads offline): the fraction of
examples whose label is among the k highest-scoring classes.

    >>> metric = evaluate.load("st3_hf/train/metrics/topk_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=[1, 2])  # ranked class indices, labels
    {'top1': 0.5, 'top2': 1.0}
"""
import datasets
import evaluate
import numpy as np


class TopkAccuracy(evaluate.Metric):
    def _info(self):
        features = {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
        return evaluate.MetricInfo(description=__doc__, citation="", features=datasets.Features(features))

    def _compute(self, predictions, references, k=(1, 5)):
        ranked, labels = np.asarray(predictions), np.asarray(references)[:, None]
        if ranked.shape[1] < max(k):
            raise ValueError(f"top{max(k)} needs {max(k)} ranked predictions per example, got {ranked.shape[1]}")
        return {f"top{int(kk)}": float((ranked[:, : int(kk)] == labels).any(axis=1).mean()) for kk in k}
