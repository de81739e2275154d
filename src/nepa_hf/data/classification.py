"""Image-classification data preparation shared by the fine-tuning and evaluation scripts.

Label columns of any common form (ClassLabel, integers, strings) become integer ids with class names (ClassLabel
names define the classes; plain integer ids must run 0..K-1 without gaps, K >= 2); labels are checked against the
number of classes BEFORE any training starts; low-label subsets and validation hold-outs are class-stratified;
`with_image_transform` turns a dataset into model inputs with unreadable images skipped and counted per file, and
the collate function drops them and batches the normalised float tensors of the image processor or the training
transforms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from .images import UnreadableImages, describe_image_source, transform_image, without_image_decoding

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "picture", "photo")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class", "target")


def label_values(dataset, label_column: str) -> np.ndarray:
    """All values of the label column, without decoding the images."""
    return np.asarray(list(dataset[label_column]))


def encode_labels(dataset, label_column: str, class_names: Sequence[str] | None = None):
    """(dataset with integer labels, class names).

    * ClassLabel columns keep their names (they define the class count, also for classes without examples).
    * String labels are mapped to ids: sorted names, or the order of `class_names` (e.g. the training split's, so that
      validation/test splits share the ids).
    * Plain integer labels: with `class_names` (another split's), kept as they are (`check_labels` checks the
      range); otherwise the ids present must be exactly 0..K-1. Gaps (e.g. 0-9 and 12, which would make a 13-way
      head with three classes never seen) are an error naming the missing ids: cast the column to ClassLabel with
      the class names when those classes really exist without examples.

    Without `class_names` (the split that defines the classes) fewer than two classes are an error: a one-class
    classifier is always right. Anything else than ClassLabel, integer or string raises a ValueError.
    """
    import datasets

    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if class_names is not None and list(class_names) != names:
            raise ValueError(
                f"Label names of this split {names} differ from the training split's {list(class_names)}."
            )
        if class_names is None:
            _check_class_count(names, label_column)
        return dataset, names
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        values = label_values(dataset, label_column)
        names = list(class_names) if class_names is not None else sorted(set(values.tolist()))
        if class_names is None:
            _check_class_count(names, label_column)
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values.tolist()) - set(index))
        if unknown:
            raise ValueError(f"Label values {unknown[:10]} do not occur in the training labels {names[:20]}.")
        dataset = dataset.map(lambda batch: {label_column: [index[v] for v in batch[label_column]]}, batched=True,
                              features=_with_class_label(dataset.features, label_column, names))
        return dataset, names
    if dtype is not None and ("int" in dtype):
        if class_names is not None:
            return dataset, list(class_names)
        values = label_values(dataset, label_column)
        if values.size and values.min() < 0:
            raise ValueError(
                f"Label column {label_column!r} has negative values ({int(values.min())}); unlabeled examples must be "
                "filtered out before fine-tuning."
            )
        present = np.unique(values)
        _check_class_count([str(i) for i in present], label_column)
        missing = np.setdiff1d(np.arange(int(present[-1]) + 1), present)
        if missing.size:
            shown = ", ".join(str(i) for i in missing[:20]) + (", ..." if missing.size > 20 else "")
            raise ValueError(
                f"Label column {label_column!r} has integer ids up to {int(present[-1])} but no example of "
                f"{missing.size} of them ({shown}): the class count would be {int(present[-1]) + 1} with classes "
                "never seen. If those classes exist, cast the column to ClassLabel with the class names, e.g. "
                f"dataset.cast_column({label_column!r}, datasets.ClassLabel(names=[...])); otherwise fix or filter the "
                "examples with the stray ids."
            )
        return dataset, [str(i) for i in present]
    raise ValueError(
        f"Label column {label_column!r} has type {feature}; expected a ClassLabel, integer or string column "
        "(multi-label and regression targets are not handled by this script)."
    )


def _check_class_count(names: Sequence[str], label_column: str) -> None:
    if len(names) < 2:
        raise ValueError(
            f"Label column {label_column!r} has {len(names)} class(es) ({list(names)[:1]}): classification needs at "
            "least 2 (a one-class model is always right). Check the label column and the split, or cast the column "
            "to ClassLabel with all the class names."
        )


def _with_class_label(features, column: str, names: Sequence[str]):
    import datasets

    features = features.copy()
    features[column] = datasets.ClassLabel(names=list(names))
    return features


def _unnamed(names: Sequence[str], kind: str) -> bool:
    """Names that only number the classes: transformers' default `LABEL_i` of a model, or the ids of a dataset with
    plain integer labels (`encode_labels` names those "0", "1", ...)."""
    placeholder = "LABEL_{}" if kind == "model" else "{}"
    return [str(name) for name in names] == [placeholder.format(i) for i in range(len(names))]


def model_class_order(class_names: Sequence[str], id2label: dict, model_name: str) -> list[str] | None:
    """How a dataset's classes (`class_names`, by id) meet a fine-tuned classifier's (`id2label`): matched by name.

    Returns the model's class names when the two are the same set in another order (the dataset's ids must then be
    remapped to the model's: `remap_labels`), None when the ids already mean the same classes (same names in the same
    order, or either side has no names and the counts agree: matched by id, with a warning). Raises a ValueError
    listing both when the class sets differ.
    """
    model_names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    names = [str(name) for name in class_names]
    if names == model_names:
        return None
    if _unnamed(model_names, "model") or _unnamed(names, "dataset"):
        if len(names) != len(model_names):
            raise ValueError(
                f"{model_name} has {len(model_names)} classes, the dataset {len(names)}. Pass "
                "--ignore_mismatched_sizes to replace its head with a new one (fine-tuning)."
            )
        side = "the model" if _unnamed(model_names, "model") else "the dataset"
        logger.warning(
            f"{side.capitalize()} has no class names, so the dataset's label ids are taken to be {model_name}'s ids "
            f"(model: {model_names[:10]}, dataset: {names[:10]}). Name the classes on both sides to have them "
            "matched by name."
        )
        return None
    if sorted(names) == sorted(model_names):
        logger.warning(
            f"The dataset has {model_name}'s classes in another order: its labels are mapped to the model's ids by "
            f"name (model: {model_names[:10]}; dataset: {names[:10]})."
        )
        return model_names
    raise ValueError(
        f"The dataset's classes are not {model_name}'s. Model ({len(model_names)}): {model_names}. Dataset "
        f"({len(names)}): {names}. Only in the dataset: {sorted(set(names) - set(model_names))}; only in the model: "
        f"{sorted(set(model_names) - set(names))}. Evaluate on data with the model's classes, or fine-tune a new head "
        "(--ignore_mismatched_sizes)."
    )


def remap_labels(dataset, label_column: str, class_names: Sequence[str], new_class_names: Sequence[str]):
    """The dataset with label ids into `class_names` turned into ids into `new_class_names` (the same names)."""
    position = {str(name): i for i, name in enumerate(new_class_names)}
    new_ids = [position[str(name)] for name in class_names]
    return dataset.map(
        lambda labels: {label_column: [new_ids[label] for label in labels]}, input_columns=label_column, batched=True,
        features=_with_class_label(dataset.features, label_column, [str(name) for name in new_class_names]),
    )


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


class ImageExample(Mapping):
    """One transformed example: `pixel_values` (None when the image was unreadable), `labels` and, for training data,
    `mixable`.

    A read-only mapping rather than a dict on purpose: the Trainer's `remove_unused_columns` strips dict keys the
    model's `forward` does not take, which would silently drop `mixable` (no Mixup); it leaves other mappings alone.
    """

    __slots__ = ("_data",)

    def __init__(self, **data):
        self._data = data

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ImageExample({self._data!r})"

    def __reduce__(self):  # pickled to and from DataLoader workers
        return _image_example, (self._data,)


def _image_example(data: dict) -> ImageExample:
    return ImageExample(**data)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` of images and labels as model inputs: per index, the image is decoded here and run through
    `transform` into normalised float `pixel_values` (C, H, W), with its integer `labels`.

    An image that cannot be read (truncated or corrupt file, missing path, ...) does not stop training: the example
    comes back with `pixel_values=None` (the collators drop it) and `unreadable` (`UnreadableImages`) warns about it
    and records its row, so the run can report how many distinct files were skipped. Decoding happens
    here rather than in `datasets` (the image column is read with `decode=False`), since a decoding error inside
    `datasets` would end the DataLoader. An error of the transform on an image that decoded is a bug, not a bad
    file: it is raised, naming the image and the transform (`transform_image`).
    """

    def __init__(self, dataset, transform: Callable, image_column: str, label_column: str | None,
                 mixable: bool = False):
        columns = [image_column] + ([label_column] if label_column is not None else [])
        if hasattr(dataset, "select_columns"):
            dataset = dataset.select_columns(columns)
        self.dataset = without_image_decoding(dataset, image_column)
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.mixable = mixable
        self.unreadable = UnreadableImages(len(self.dataset))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> ImageExample:
        row, pixel_values = {}, None
        try:
            row = self.dataset[index]
        except Exception as error:  # a row the dataset itself cannot read
            self.unreadable.skip(index, f"#{index}", error)
        else:
            image = self.unreadable.read(row[self.image_column], f"#{index}", index)
            if image is not None:
                source = describe_image_source(row[self.image_column], f"#{index}")
                pixel_values = transform_image(self.transform, image, source)
        example = {"pixel_values": pixel_values}
        if self.label_column is not None:
            example["labels"] = row.get(self.label_column)
        if self.mixable:
            example[MIXABLE_KEY] = True
        return ImageExample(**example)


def with_image_transform(dataset, transform: Callable, image_column: str, label_column: str | None,
                         mixable: bool = False) -> ImageClassificationDataset:
    """The dataset to train or evaluate on: {"pixel_values": float (C, H, W), "labels": int} per example, with
    unreadable images skipped and counted (see `ImageClassificationDataset`; use the returned dataset, the input
    is left as it is).

    `transform` maps one image to a normalised tensor (`AugmentationArguments.train_transform`, or
    `nepa_hf.data.transforms.ImageProcessorTransform` for evaluation). `mixable=True` marks training examples for
    `MixupCollator`.
    """
    return ImageClassificationDataset(dataset, transform, image_column, label_column, mixable)


def drop_unreadable(examples: Sequence) -> list:
    """The examples whose image could be read (`pixel_values` not None). Raises a ValueError when none is left: a
    batch needs at least one image, and a whole batch of unreadable files means the data need fixing."""
    if not examples:
        raise ValueError("Got an empty list of examples to collate.")
    readable = [example for example in examples if example["pixel_values"] is not None]
    if not readable:
        raise ValueError(
            f"All {len(examples)} images of a batch are unreadable (the warnings above name the files): fix or remove "
            "them, or raise the batch size if only a few files are broken."
        )
    return readable


def collate_image_batch(examples: list) -> dict:
    """Stack per-example normalised float `pixel_values` and integer `labels`, dropping examples whose image was
    unreadable (`pixel_values` None; see `ImageClassificationDataset`).

    Integer pixels are refused: a model fed 0-255 values trains on unnormalised inputs while pipelines normalise at
    inference, so build examples with the image processor or the `nepa_hf` transforms.
    """
    if examples and any("pixel_values" not in example for example in examples):
        raise ValueError(
            f"Examples without 'pixel_values' (keys {sorted(examples[0])}): pass the dataset returned by "
            "with_image_transform(...) (it does not change its input in place)."
        )
    examples = drop_unreadable(examples)
    pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples])
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values are {pixel_values.dtype}, not normalised floats: transform the images with the image "
            "processor (nepa_hf.data.transforms.ImageProcessorTransform) or AugmentationArguments.train_transform."
        )
    batch = {"pixel_values": pixel_values}
    if "labels" in examples[0] and examples[0]["labels"] is not None:
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch


__all__ = [
    "ImageClassificationDataset",
    "ImageExample",
    "MIXABLE_KEY",
    "IMAGE_COLUMN_CANDIDATES",
    "LABEL_COLUMN_CANDIDATES",
    "check_labels",
    "collate_image_batch",
    "drop_unreadable",
    "encode_labels",
    "label_values",
    "model_class_order",
    "remap_labels",
    "stratified_indices",
    "stratified_subset",
    "train_validation_split",
    "with_image_transform",
]
