"""Image-classification data preparation shared by the fine-tuning and evaluation scripts.

Label columns of any common form (ClassLabel, integers, strings) become integer ids with class names; labels are
checked against the number of classes BEFORE any training starts; low-label subsets and validation hold-outs are
class-stratified; a collate function batches the normalised float tensors of the image processor or the
training transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture", "photo")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target")


def label_values(dataset, label_column: str) -> np.ndarray:
    """All values of the label column, without decoding the images."""
    return np.asarray(list(dataset[label_column]))


def encode_labels(dataset, label_column: str, class_names: Sequence[str] | None = None):
    """(dataset with integer labels, class names).

    ClassLabel columns keep their names. String labels are mapped to ids (sorted names, or the order of
    `class_names`, e.g. the training split's, so that validation/test splits share the ids). Integer labels get
    names "0".."K-1" unless `class_names` is given. Anything else raises a ValueError.
    """
    import datasets

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if class_names is not None and list(class_names) != names:
            raise ValueError(
                f"Label names of this split {names} differ from the training split's {list(class_names)}."
            )
        return dataset, names
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        values = label_values(dataset, label_column)
        names = list(class_names) if class_names is not None else sorted(set(values.tolist()))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values.tolist()) - set(index))
        if unknown:
            raise ValueError(f"Label values {unknown[:10]} do not occur in the training labels {names[:20]}.")
        dataset = dataset.map(lambda batch: {label_column: [index[v] for v in batch[label_column]]}, batched=True,
                              features=_with_class_label(dataset.features, label_column, names))
        return dataset, names
    if dtype is not None and ("int" in dtype):
        values = label_values(dataset, label_column)
        if class_names is not None:
            return dataset, list(class_names)
        if values.size and values.min() < 0:
            raise ValueError(
                f"Label column {label_column!r} has negative values ({int(values.min())}); unlabeled examples must be "
                "filtered out before fine-tuning."
            )
        count = int(values.max()) + 1 if values.size else 0
        return dataset, [str(i) for i in range(count)]
    raise ValueError(
        f"Label column {label_column!r} has type {feature}; expected a ClassLabel, integer or string column "
        "(multi-label and regression targets are not handled by this script)."
    )


def _with_class_label(features, column: str, names: Sequence[str]):
    import datasets

    features = features.copy()
    features[column] = datasets.ClassLabel(names=list(names))
    return features


def check_labels(dataset, label_column: str, num_labels: int, split: str = "train") -> None:
    """Raise a ValueError naming the bad values if any label is outside [0, num_labels)."""
    values = label_values(dataset, label_column)
    if values.size == 0:
        raise ValueError(f"The {split} split is empty.")
    bad = values[(values < 0) | (values >= num_labels)]
    if bad.size:
        raise ValueError(
            f"{bad.size} label(s) of the {split} split are outside [0, {num_labels}) (e.g. {sorted(set(bad.tolist()))[:10]}): "
            f"the model has {num_labels} labels. Filter out unlabeled examples (often -1) or fix the number of "
            "labels (a fine-tuned checkpoint with a different head needs --ignore_mismatched_sizes)."
        )


def stratified_indices(labels: Sequence[int], fraction: float | None = None, count: int | None = None,
                       seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-stratified random subset: `fraction` of each class (at least one example of every
    class present), or `count` examples in all, split across classes in proportion."""
    labels = np.asarray(labels)
    if (fraction is None) == (count is None):
        raise ValueError("Pass exactly one of fraction and count.")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    total = len(labels)
    if count is not None:
        if count <= 0:
            raise ValueError(f"count must be > 0, got {count}.")
        if count >= total:
            return np.arange(total)
        fraction = count / total
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    quotas = np.maximum(1, np.floor(class_counts * fraction).astype(int))
    if count is not None:  # hand out the rounding remainder to the classes with the largest remainders
        remainders = class_counts * fraction - np.floor(class_counts * fraction)
        for position in np.argsort(-remainders)[: max(0, count - int(quotas.sum()))]:
            quotas[position] += 1
    keep = []
    for cls, quota in zip(classes, quotas):
        members = np.flatnonzero(labels == cls)
        keep.append(rng.choice(members, size=min(quota, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def stratified_subset(dataset, label_column: str, fraction: float | None = None, count: int | None = None,
                      seed: int = 0):
    """A class-stratified subset of a `datasets.Dataset` (low-label studies: `fraction=0.1` keeps 10% per class)."""
    return dataset.select(stratified_indices(label_values(dataset, label_column), fraction, count, seed))


def train_validation_split(dataset, label_column: str, validation_fraction: float = 0.1, seed: int = 0):
    """(train, validation): hold out `validation_fraction` of every class."""
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    held_out = stratified_indices(label_values(dataset, label_column), fraction=validation_fraction, seed=seed)
    rest = np.setdiff1d(np.arange(len(dataset)), held_out)
    if rest.size == 0:
        raise ValueError("The dataset is too small to hold out a validation split; pass a validation split.")
    return dataset.select(rest), dataset.select(held_out)


# Set on examples of a training set so `MixupCollator` mixes their batches and leaves evaluation batches alone.
MIXABLE_KEY = "mixable"


def with_image_transform(dataset, transform: Callable, image_column: str, label_column: str | None,
                         mixable: bool = False):
    """Set a lazy transform producing {"pixel_values": float (C, H, W), "labels": int} per example.

    `transform` maps one image to a normalised tensor (`AugmentationArguments.train_transform`, or
    `nepa_hf.transforms.ImageProcessorTransform` for evaluation). `mixable=True` marks training examples for
    `MixupCollator`.
    """

    def apply(batch):
        out = {"pixel_values": [transform(image) for image in batch[image_column]]}
        if label_column is not None:
            out["labels"] = batch[label_column]
        if mixable:
            out[MIXABLE_KEY] = [True] * len(out["pixel_values"])
        return out

    dataset.set_transform(apply)
    return dataset


def collate_image_batch(examples: list[dict]) -> dict:
    """Stack per-example normalised float `pixel_values` and integer `labels`.

    Integer pixels are refused: a model fed 0-255 values trains on unnormalised inputs while pipelines normalise at
    inference, so build examples with the image processor or the `nepa_hf` transforms.
    """
    if not examples:
        raise ValueError("collate_image_batch got an empty list of examples.")
    pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values are {pixel_values.dtype}, not normalised floats: transform the images with the image "
            "processor (nepa_hf.transforms.ImageProcessorTransform) or AugmentationArguments.train_transform."
        )
    batch = {"pixel_values": pixel_values}
    if "labels" in examples[0] and examples[0]["labels"] is not None:
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch


__all__ = [
    "MIXABLE_KEY",
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "check_labels",
    "collate_image_batch",
    "encode_labels",
    "label_values",
    "stratified_indices",
    "stratified_subset",
    "train_validation_split",
    "with_image_transform",
]
