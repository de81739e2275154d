"""Top-k accuracy as a local `evaluate` metric module (loads offline with `evaluate.load(<this folder>)`).

`compute(predictions=[[score per class]], references=[int], k=5)` -> {"top5_accuracy": float}: the fraction of
examples whose reference is among the k highest-scoring classes (ties broken by class index).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-k accuracy: the proportion of examples whose label is among the k highest-scoring classes."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of float): per-class scores (logits or probabilities), one row per example.
    references (list of int): ground-truth labels.
    k (int): how many top classes count as correct (default 5).
Returns:
    top{k}_accuracy (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float32")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=5):
        scores = np.asarray(predictions, dtype=np.float64)
        references = np.asarray(references)
        if scores.ndim != 2 or scores.shape[0] != references.shape[0]:
            raise ValueError(f"predictions must be (examples, classes) scores; got {scores.shape} for "
                             f"{references.shape[0]} references.")
        if not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be in [1, {scores.shape[1]}] (the number of classes), got {k}.")
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return {f"top{k}_accuracy": float((top == references[:, None]).any(axis=1).mean())}
