# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Mean IoU for semantic segmentation, as a local `evaluate` metric (no Hub access needed).

Load it by path: `nepa_hf.evaluation.features.load_metric("mean_iou")` (the folder shipped with nepa_hf, loaded by path).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Intersection over union per class, accumulated over all images (each pixel counts once, as in mmsegmentation):
IoU_c = |pred == c and label == c| / |pred == c or label == c| over the labelled pixels, i.e. pixels whose
reference is not `ignore_index`. `mean_iou` averages IoU over the classes that occur in the references or the
predictions (a class absent from both has NaN IoU and is skipped).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) integer arrays, predicted class indices.
    references: list of (H, W) integer arrays (same shapes), ground-truth class indices.
    num_labels: number of classes.
    ignore_index: reference value of unlabelled pixels, excluded everywhere (default 255).
    reduce_labels: first map reference 0 to ignore_index and subtract 1 from the others (ADE20K raw maps).
Returns:
    mean_iou: mean of the per-class IoU over classes present in references or predictions.
    mean_accuracy: mean over classes present in the references of the per-class pixel accuracy (recall).
    overall_accuracy: correctly classified labelled pixels / labelled pixels.
    per_category_iou, per_category_accuracy: arrays of length num_labels (NaN where undefined).
Examples:
    >>> metric = load_metric("mean_iou")
    >>> metric.compute(predictions=[np.array([[0, 1], [1, 1]])], references=[np.array([[0, 1], [0, 255]])],
    ...                num_labels=2)["mean_iou"]
    0.5
"""


def intersect_and_union(prediction, reference, num_labels, ignore_index=255, reduce_labels=False):
    """Per-class (intersection, union, predicted area, reference area) pixel counts of one image."""
    prediction, reference = np.asarray(prediction).astype(np.int64), np.asarray(reference).astype(np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(f"Prediction shape {prediction.shape} differs from reference shape {reference.shape}.")
    if reduce_labels:
        reduced = reference - 1
        reduced[reference == 0] = ignore_index
        reduced[reference == ignore_index] = ignore_index
        reference = reduced
    labelled = reference != ignore_index
    prediction, reference = prediction[labelled], reference[labelled]
    for name, values in (("predictions", prediction), ("references", reference)):
        if values.size and (values.min() < 0 or values.max() >= num_labels):
            raise ValueError(
                f"{name} contain class indices outside [0, {num_labels - 1}] (num_labels={num_labels}): "
                f"min {values.min()}, max {values.max()}. Check num_labels, ignore_index and reduce_labels."
            )
    area_intersection = np.bincount(prediction[prediction == reference], minlength=num_labels)
    area_prediction = np.bincount(prediction, minlength=num_labels)
    area_reference = np.bincount(reference, minlength=num_labels)
    area_union = area_prediction + area_reference - area_intersection
    return area_intersection, area_union, area_prediction, area_reference


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255, reduce_labels=False):
        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} predictions for {len(references)} references.")
        totals = np.zeros((4, num_labels), dtype=np.int64)
        for prediction, reference in zip(predictions, references):
            totals += np.stack(intersect_and_union(prediction, reference, num_labels, ignore_index, reduce_labels))
        intersection, union, _, reference_area = totals.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersection / union
            accuracy = intersection / reference_area
        labelled = reference_area.sum()
        return {
            "mean_iou": float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            "mean_accuracy": float(np.nanmean(accuracy)) if np.any(reference_area > 0) else float("nan"),
            "overall_accuracy": float(intersection.sum() / labelled) if labelled else float("nan"),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
