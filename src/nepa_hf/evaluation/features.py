"""Evaluation: classification metrics through `evaluate` (offline), and frozen-backbone evaluation.

* `load_metric` / `classification_metrics`: accuracy and top-k accuracy from the local metric modules shipped in
  `nepa_hf/evaluation/metrics/` (loaded by path, so no network); any other name goes to `evaluate.load` (e.g. a Hub metric).
* `extract_features`: pooled features of a frozen NEPA backbone (mean of patch tokens, CLS, last token or the
  model's pooler; any layer).
* `knn_classify` / `knn_accuracy`: weighted k-NN on cosine similarity (k=20, temperature 0.07, as in DINO).
* `train_linear_probe` / `linear_probe_accuracy`: a logistic-regression probe trained with AdamW on the features.

Note: the paper reports linear probing of NEPA as weak; fine-tuning is its protocol.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METRICS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics")
LOCAL_METRICS = ("accuracy", "top_k_accuracy", "mean_iou")


def local_metric_path(name: str) -> str | None:
    """Folder of a metric module shipped with nepa-hf, or None."""
    path = os.path.join(METRICS_DIR, name)
    return path if name in LOCAL_METRICS and os.path.isfile(os.path.join(path, f"{name}.py")) else None


def load_metric(name: str = "accuracy", **kwargs):
    """`evaluate.load` that prefers the local module for "accuracy" / "top_k_accuracy" / "mean_iou" (works offline); other names
    (Hub metrics, paths to metric scripts) are passed to `evaluate.load` unchanged."""
    import evaluate

    return evaluate.load(local_metric_path(name) or name, **kwargs)


def classification_metrics(num_labels: int, top_k: int = 5):
    """A `compute_metrics` for Trainer: {"accuracy", f"top{k}_accuracy"} (top-k only when num_labels > k)."""
    accuracy = load_metric("accuracy")
    top_k_accuracy = load_metric("top_k_accuracy") if num_labels > top_k else None

    def compute_metrics(eval_prediction) -> dict:
        logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        labels = np.asarray(labels)
        if labels.ndim == 2:  # soft targets (should not reach evaluation, but be robust)
            labels = labels.argmax(-1)
        results = accuracy.compute(predictions=np.asarray(logits).argmax(-1), references=labels)
        if top_k_accuracy is not None:
            results.update(top_k_accuracy.compute(predictions=np.asarray(logits), references=labels, k=top_k))
        return results

    return compute_metrics


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def iterate_batches(data, batch_size: int = 128) -> Iterable[dict]:
    """Batches {"pixel_values", optional "labels"} from a pixel tensor, a (pixels, labels) pair, or an iterable of
    batch dicts (e.g. a DataLoader)."""
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, tuple):
        pixels, labels = data
        for start in range(0, len(pixels), batch_size):
            batch = {"pixel_values": pixels[start : start + batch_size]}
            if labels is not None:
                batch["labels"] = torch.as_tensor(labels[start : start + batch_size])
            yield batch
        return
    for batch in data:
        if not isinstance(batch, Mapping) or "pixel_values" not in batch:
            raise ValueError("Expected batches as dicts with a 'pixel_values' entry (and optionally 'labels').")
        yield batch


def _prepare_pixels(batch: dict, device, dtype) -> torch.Tensor:
    pixels = torch.as_tensor(batch["pixel_values"])
    if not pixels.is_floating_point():
        raise ValueError(
            f"pixel_values are {pixels.dtype}, not normalised floats: preprocess the images with the model's image "
            "processor (e.g. nepa_hf.data.transforms.ImageProcessorTransform in the dataset)."
        )
    return pixels.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuned classifier
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(model: nn.Module, data, batch_size: int = 128, device=None):
    """(logits [N, C] float32 CPU, labels [N] or None) of a classification model over the data."""
    model.eval()
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    all_logits, all_labels = [], []
    for batch in iterate_batches(data, batch_size):
        all_logits.append(model(pixel_values=_prepare_pixels(batch, device, dtype)).logits.float().cpu())
        if batch.get("labels") is not None:
            all_labels.append(torch.as_tensor(batch["labels"]).cpu())
    return torch.cat(all_logits), (torch.cat(all_labels) if all_labels else None)


def classification_accuracy(model: nn.Module, data, batch_size: int = 128, top_k: int = 5) -> dict:
    """{"accuracy", "top{k}_accuracy"} of a classifier, computed with the local `evaluate` metric modules."""
    logits, labels = predict_logits(model, data, batch_size=batch_size)
    if labels is None:
        raise ValueError("The data has no labels: cannot compute accuracy.")

    class _Prediction:
        predictions, label_ids = logits.numpy(), labels.numpy()

    return classification_metrics(logits.shape[-1], top_k)(_Prediction())


# ----------------------------------------------------------------------------------------------------------------
# Frozen features
# ----------------------------------------------------------------------------------------------------------------

POOLINGS = ("mean", "cls", "last", "pooler")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    data,
    pooling: str = "mean",
    layer: int | None = None,
    apply_norm: bool = True,
    is_causal: bool | None = None,
    batch_size: int = 128,
    device=None,
):
    """Pooled features of a frozen NEPA backbone: (features [N, D] float32 CPU, labels [N] or None).

    Args:
        model: `NepaModel` or any NEPA head model (its `base_model` is used, so heads are ignored).
        data: pixel tensor, (pixels, labels) pair, or iterable of batch dicts (see `iterate_batches`).
        pooling: "mean" (patch tokens, CLS excluded), "cls" (token 0), "last" (final patch, the natural summary of
            a causal model), or "pooler" (the model's own pooled output).
        layer: None for the final output; k in 1..L for the output of block k (0: the input embeddings).
        apply_norm: apply the backbone's final LayerNorm to intermediate layers (the final output has it already).
        is_causal: attention for the forward pass; None uses the model's own (`config.resolved_is_causal`: causal for
            pretraining checkpoints, bidirectional for the trunk of a head).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    backbone = getattr(model, "base_model", model)
    backbone.eval()
    device = device or next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    num_layers = backbone.config.num_hidden_layers
    if layer is not None and not -num_layers - 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}] (or negative from the end), got {layer}.")
    if layer is not None and layer < 0:
        layer = num_layers + 1 + layer
    final = layer is None or layer == num_layers
    if pooling == "pooler" and not final:
        raise ValueError("pooling='pooler' is only defined for the final layer; use 'mean', 'cls' or 'last'.")
    features, labels = [], []
    for batch in iterate_batches(data, batch_size):
        pixels = _prepare_pixels(batch, device, dtype)
        outputs = backbone(pixels, is_causal=is_causal, output_hidden_states=not final)
        if pooling == "pooler":
            pooled = outputs.pooler_output
        else:
            if final:
                tokens = outputs.last_hidden_state
            else:
                tokens = outputs.hidden_states[layer]
                if apply_norm:
                    tokens = backbone.norm(tokens)
            pooled = {"mean": lambda t: t[:, 1:].mean(1), "cls": lambda t: t[:, 0], "last": lambda t: t[:, -1]}[pooling](tokens)
        features.append(pooled.float().cpu())
        if batch.get("labels") is not None:
            labels.append(torch.as_tensor(batch["labels"]).cpu())
    return torch.cat(features), (torch.cat(labels) if labels else None)


# ----------------------------------------------------------------------------------------------------------------
# k-NN
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 1024) -> torch.Tensor:
    """Class scores [Q, C] of a weighted k-NN: cosine similarity to the training features, the k nearest vote with
    weight exp(similarity / temperature) (DINO's k-NN classifier)."""
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features for {len(train_labels)} labels.")
    train_labels = train_labels.long()
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1)
    scores = []
    for queries in F.normalize(query_features.float(), dim=1).split(chunk_size):
        similarity, index = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(queries), num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores)


def _accuracies(scores: torch.Tensor, labels: torch.Tensor, top_k: int = 5) -> dict:
    labels = labels.long()
    results = {"accuracy": (scores.argmax(1) == labels).float().mean().item()}
    if scores.shape[1] > top_k:
        top = scores.topk(top_k, dim=1).indices
        results[f"top{top_k}_accuracy"] = (top == labels[:, None]).any(1).float().mean().item()
    return results


def knn_accuracy(train_features, train_labels, test_features, test_labels, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> dict:
    """{"accuracy", "top5_accuracy"} of the weighted k-NN classifier."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_classify(train_features, train_labels, test_features, k, temperature, num_classes)
    return _accuracies(scores, test_labels)


# ----------------------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------------------


class LinearProbe(nn.Module):
    """Standardise features with the training mean/std (frozen), then one Linear layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear((features - self.mean) / self.std)


def train_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int | None = None,
                       epochs: int = 100, learning_rate: float = 1e-2, weight_decay: float = 1e-4,
                       batch_size: int = 256, seed: int = 0) -> LinearProbe:
    """Multinomial logistic regression on frozen features: AdamW, cosine lr decay, mini-batches."""
    features = train_features.float()
    labels = train_labels.long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    probe = LinearProbe(features.mean(0), features.std(0).clamp_min(1e-6), num_classes)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    probe.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for index in order.split(batch_size):
                loss = F.cross_entropy(probe(features[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
    return probe.eval()


@torch.no_grad()
def linear_probe_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int | None = None,
                          **kwargs) -> dict:
    """{"accuracy", "top5_accuracy"} of a linear probe trained on the training features (kwargs: see
    `train_linear_probe`)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    probe = train_linear_probe(train_features, train_labels, num_classes=num_classes, **kwargs)
    return _accuracies(probe(test_features.float()), test_labels)


__all__ = [
    "LinearProbe",
    "METRICS_DIR",
    "POOLINGS",
    "classification_accuracy",
    "classification_metrics",
    "extract_features",
    "iterate_batches",
    "knn_accuracy",
    "knn_classify",
    "linear_probe_accuracy",
    "load_metric",
    "local_metric_path",
    "predict_logits",
    "train_linear_probe",
]
