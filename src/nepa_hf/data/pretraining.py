# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Pretraining data: images in, fixed-shape float batches out, with unreadable files skipped and counted.

- `PretrainingImageDataset` / `PretrainingIterableDataset` decode and crop one image at a time in DataLoader workers
  and return an `{"unreadable": key}` marker for an unreadable or truncated file (key: the row index, or a hash of
  the file's path or bytes when streaming).
- `PretrainingCollator` turns those markers into flagged placeholder rows (`valid == False`, the key in
  `unreadable_keys`), so batches keep their shape (Accelerate can dispatch them) and which files were skipped travels
  with the batch across workers and processes; `select_readable` drops the placeholders on the device and
  `skipped_file_keys` hands their keys to `data.images.UnreadableImages`, which counts each file once however often
  it is read.
- Per-sample randomness (crop, flip, input mask) runs under a seed made from (seed, epoch, index), so the augmented
  data do not depend on the number of workers or processes, nor on where a run was resumed; `EpochShuffleSampler`
  draws the order from (seed, epoch) alone. The transform is the authors' (`data.transforms.pretraining_transform`).
- `pretraining_images` picks the image column and sets up streaming; `pretraining_dataloader` puts the pieces above
  together into the training DataLoader; `dataset_identity` is what a checkpoint records of the data, so that a
  resume onto other data is caught.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .images import (UNKNOWN_FILE, UnreadableImages, describe_image_source, resolve_column, transform_image,
                     without_image_decoding)
from .transforms import seeded, to_rgb


def sample_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from a base seed and integer keys (e.g. epoch and sample index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


def random_patch_mask(
    batch_size: int, num_patches: int, ratio: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Boolean (batch_size, num_patches) mask with exactly round(ratio * num_patches) True entries per row, placed
    uniformly at random (True = replace that patch's input with the mask token)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}.")
    num_masked = int(round(ratio * num_patches))
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool)
    if num_masked > 0:
        noise = torch.rand(batch_size, num_patches, generator=generator)
        mask.scatter_(1, noise.argsort(dim=1)[:, :num_masked], True)
    return mask.to(device) if device is not None else mask


UNREADABLE_KEY = "unreadable"


def unreadable_file_key(value) -> int:
    """A stable non-negative 62-bit key for the file behind a streamed dataset value (its path, else its bytes), so
    a file that fails in every epoch counts once; `UNKNOWN_FILE` for values that are neither."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, (bytes, bytearray)) else None
    if path:
        data = os.fsencode(path)
    if not data:
        return UNKNOWN_FILE
    return int.from_bytes(hashlib.blake2b(bytes(data), digest_size=8).digest(), "little") >> 2


class _SampleProcessor:
    """Shared per-sample logic of the two dataset wrappers: decode -> RGB (or L) -> transform -> (mask), all under
    the sample's seed; `{"unreadable": key}` when unreadable (skipped by `UnreadableImages`' rule; the batches carry
    the keys to the count)."""

    def __init__(self, transform, seed: int, num_channels: int, mask_ratio: float, num_patches: int | None):
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}.")
        if mask_ratio and not num_patches:
            raise ValueError("num_patches is required when mask_ratio > 0.")
        self.transform = transform
        self.seed = seed
        self.num_channels = num_channels
        self.mask_ratio = mask_ratio
        self.num_patches = num_patches
        self.unreadable = UnreadableImages()

    def __call__(self, value, seed: int, where, key: int) -> dict:
        image = self.unreadable.read(value, where, key)
        if image is None:
            return {UNREADABLE_KEY: key}
        image = to_rgb(image)  # 16-bit/float sources are rescaled, not clipped
        if self.num_channels == 1:
            image = image.convert("L")
        with seeded(seed):  # a transform error is a bug, not a bad file: raised, naming the image (transform_image)
            pixels = transform_image(self.transform, image, describe_image_source(value, where))
            mask = random_patch_mask(1, self.num_patches, self.mask_ratio)[0] if self.mask_ratio else None
        sample = {"pixel_values": pixels}
        if mask is not None:
            sample["bool_masked_pos"] = mask
        return sample


class PretrainingImageDataset(torch.utils.data.Dataset):
    """Map-style pretraining data: one decoded, augmented, normalised image per index, or `{"unreadable": index}`
    when the image cannot be read.

    Args:
        dataset: a `datasets.Dataset` (or any sequence of rows / images).
        image_column: column holding the images (None when the items are images themselves). Other columns,
            labels included, are ignored.
        transform: per-sample transform from an RGB (or, with num_channels=1, "L") PIL image to a float (C, H, W)
            tensor, e.g. `nepa_hf.data.transforms.pretraining_transform`. It runs under the sample's seed.
        seed: base seed of the per-sample seeds.
        num_channels: 3 (grayscale sources become RGB) or 1 (everything becomes grayscale).
        mask_ratio, num_patches: also return a random `bool_masked_pos` of `num_patches` entries per sample.

    Indices may be plain ints or `(epoch, index)` pairs (from `EpochShuffleSampler`); the per-sample seed comes from
    (seed, epoch, index), so a sample's augmentation is the same whichever worker or process loads it.
    """

    def __init__(self, dataset, image_column: str | None, transform, seed: int = 0, num_channels: int = 3,
                 mask_ratio: float = 0.0, num_patches: int | None = None):
        if image_column is not None and hasattr(dataset, "select_columns"):
            dataset = dataset.select_columns([image_column])  # labels and other columns are never decoded
        self.dataset = without_image_decoding(dataset, image_column) if image_column is not None else dataset
        self.image_column = image_column
        self.processor = _SampleProcessor(transform, seed, num_channels, mask_ratio, num_patches)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            row = self.dataset[index]
            value = row[self.image_column] if self.image_column is not None else row
        except Exception as error:  # e.g. a row the dataset itself cannot read
            self.processor.unreadable.skip(index, f"#{index}", error)
            return {UNREADABLE_KEY: index}
        return self.processor(value, sample_seed(self.processor.seed, epoch, index), f"#{index}", index)


class PretrainingIterableDataset(torch.utils.data.IterableDataset):
    """Streaming pretraining data (e.g. a `datasets.IterableDataset` from `streaming=True`), same outputs as
    `PretrainingImageDataset`.

    A `datasets.IterableDataset` splits its shards across DataLoader workers itself; other iterables are split
    round-robin here. Per-sample seeds come from (seed, epoch, worker, position), so unlike the map-style
    wrapper the augmentation depends on the number of workers. With several processes Accelerate dispatches the
    batches from the main process (its workers read and decode for everyone, the others receive slices).
    """

    def __init__(self, dataset: Iterable, image_column: str | None, transform, seed: int = 0,
                 num_channels: int = 3, mask_ratio: float = 0.0, num_patches: int | None = None):
        self.dataset = without_image_decoding(dataset, image_column) if image_column is not None else dataset
        self.image_column = image_column
        self.processor = _SampleProcessor(transform, seed, num_channels, mask_ratio, num_patches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):  # reshuffles a shuffled `datasets.IterableDataset`
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            from datasets import IterableDataset as HFIterableDataset

            shards_itself = isinstance(self.dataset, HFIterableDataset)
        except ImportError:  # pragma: no cover - datasets is a dependency
            shards_itself = False
        for position, row in enumerate(self.dataset):
            if not shards_itself and position % num_workers != worker_id:
                continue
            seed = sample_seed(self.processor.seed, self.epoch, worker_id, position)
            value = row[self.image_column] if self.image_column is not None else row
            yield self.processor(value, seed, f"#{position} of worker {worker_id}", unreadable_file_key(value))


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` keys in a permutation drawn from (seed, epoch).

    The order depends only on the seed and the epoch (set with `set_epoch`, which Accelerate's data loaders call),
    so every process sees the same permutation (Accelerate then hands each process its own batches) and a resumed
    run replays exactly the same order. Carrying the epoch in the key lets the dataset seed per-sample augmentation
    without any state in the (possibly persistent) workers.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        return ((epoch, index) for index in order)


class PretrainingCollator:
    """Batch samples from the pretraining datasets, keeping unreadable ones as flagged placeholders.

    Returns `pixel_values` float (B, C, H, W), `valid` bool (B,), `unreadable_keys` int64 (B,) (the file key of each
    unreadable row, -1 elsewhere) and, with masking, `bool_masked_pos` (B, N). Rows with `valid == False` are
    zeros: the batch keeps its shape (what Accelerate's batch dispatching and compiled models want) and which images
    were skipped reaches the training loop from any worker/process. A `None` sample counts as unreadable with no
    file key.
    """

    def __init__(self, num_channels: int, image_size: int | Sequence[int], num_patches: int | None = None):
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_shape = (num_channels, height, width)
        self.num_patches = num_patches

    def __call__(self, samples: list[dict | None]) -> dict[str, torch.Tensor]:
        readable = [sample is not None and "pixel_values" in sample for sample in samples]
        valid = torch.tensor(readable, dtype=torch.bool)
        keys = torch.tensor([UNKNOWN_FILE if ok or sample is None else int(sample[UNREADABLE_KEY])
                             for ok, sample in zip(readable, samples)], dtype=torch.int64)
        pixel_values = torch.zeros((len(samples), *self.image_shape), dtype=torch.float32)
        masks = torch.zeros(len(samples), self.num_patches or 0, dtype=torch.bool) if self.num_patches else None
        for row, (ok, sample) in enumerate(zip(readable, samples)):
            if not ok:
                continue
            if tuple(sample["pixel_values"].shape) != self.image_shape:
                raise ValueError(
                    f"Sample has shape {tuple(sample['pixel_values'].shape)}, expected {self.image_shape}: the "
                    "transform's size and channels must match the collator's."
                )
            pixel_values[row] = sample["pixel_values"]
            if masks is not None:
                masks[row] = sample["bool_masked_pos"]
        batch = {"pixel_values": pixel_values, "valid": valid, "unreadable_keys": keys}
        if masks is not None:
            batch["bool_masked_pos"] = masks
        return batch


_BOOKKEEPING_KEYS = ("valid", "unreadable_keys")


def select_readable(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Drop the placeholder rows of unreadable images from a collated batch.

    Returns (model inputs: the batch without `valid` and `unreadable_keys`, number of skipped rows). When every row
    was skipped the placeholders are kept so each process still runs a forward/backward (DDP needs all processes to
    take part); `readable_loss_weight` is then 0 for that process.
    """
    valid = batch["valid"]
    inputs = {key: value for key, value in batch.items() if key not in _BOOKKEEPING_KEYS}
    num_skipped = int(valid.numel() - valid.sum().item())
    if num_skipped in (0, valid.numel()):
        return inputs, num_skipped
    return {key: value[valid] for key, value in inputs.items()}, num_skipped


def skipped_file_keys(batch: dict[str, torch.Tensor]) -> list[int]:
    """The file keys of a batch's unreadable rows (`UNKNOWN_FILE` for rows that name no file). Reads the device:
    call it only for a batch known to have skipped rows."""
    return batch["unreadable_keys"][~batch["valid"]].tolist()


IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "jpg", "png", "webp")


def pretraining_images(dataset, image_column: str | None = None, streaming: bool = False, seed: int = 0,
                       shuffle_buffer_size: int = 10_000, num_shards: int = 1):
    """(dataset, image column) for `pretraining_dataloader`. The column is `image_column`, else detected among
    `IMAGE_COLUMN_CANDIDATES` ("image" for a streamed dataset that does not list its columns). With `streaming` the
    data pass through a shuffle buffer; a `datasets.Dataset` (built-in or local data, e.g. to try the streaming path)
    is streamed in `num_shards` shards (one per DataLoader worker)."""
    if getattr(dataset, "column_names", None) is None:
        image_column = image_column or "image"
    else:
        image_column = resolve_column(dataset, image_column, IMAGE_COLUMN_CANDIDATES, "image")
    if streaming:
        if hasattr(dataset, "to_iterable_dataset"):
            dataset = dataset.to_iterable_dataset(num_shards=max(1, num_shards))
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
    return dataset, image_column


def dataset_identity(dataset, image_column: str | None = None, seed: int | None = None) -> dict:
    """What a checkpoint records of the training data, so that a resume onto changed data is caught (a data position
    then means other images): `num_images` and a cheap `dataset_fingerprint`. A `datasets.Dataset` has its own
    fingerprint, which changes with its data files, the subset drawn (--max_train_samples and --seed) and every
    transform applied; for another sequence it is a hash of its length and of up to 8 evenly spaced rows' file
    identities (paths or bytes, as `unreadable_file_key` takes them; in-memory images have none, so then only the
    length counts). The sampler's `seed`, which orders every epoch, is part of the fingerprint: a data position under
    another seed means other images too. A stream has no length nor position to check: both are None."""
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        return {"num_images": None, "dataset_fingerprint": None}
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        rows = sorted({round(i * (len(dataset) - 1) / 7) for i in range(8)}) if len(dataset) else []
        keys = [unreadable_file_key(dataset[i][image_column] if image_column else dataset[i]) for i in rows]
        fingerprint = hashlib.blake2b(repr((len(dataset), keys)).encode(), digest_size=8).hexdigest()
    return {"num_images": len(dataset),
            "dataset_fingerprint": fingerprint if seed is None else f"{fingerprint}_seed{seed}"}


def pretraining_dataloader(dataset, image_column: str | None, transform, *, batch_size: int, image_size: int,
                           num_channels: int = 3, seed: int = 0, mask_ratio: float = 0.0, patch_size: int | None = None,
                           num_workers: int = 0, pin_memory: bool = False,
                           num_processes: int = 1) -> torch.utils.data.DataLoader:
    """The training DataLoader over `dataset` (a `datasets.Dataset` or any sequence: `PretrainingImageDataset` in the
    order of `EpochShuffleSampler`; a `datasets.IterableDataset` or other iterable: `PretrainingIterableDataset`),
    batched by `PretrainingCollator` with the last incomplete batch dropped. Hand it to `accelerator.prepare`, and
    call `set_epoch` before each epoch.

    A map-style dataset smaller than one global batch (`batch_size` x `num_processes`) is refused. With
    `mask_ratio > 0` each sample also gets a random `bool_masked_pos` over its (image_size // patch_size)**2
    patches. The DataLoader gets its own generator: creating its iterator then leaves the global RNG alone, which
    the model's RoPE augmentation draws from, so a resumed run replays the same draws.
    """
    num_patches = (image_size // patch_size) ** 2 if mask_ratio > 0 else None
    if hasattr(dataset, "__len__") and len(dataset) < batch_size * num_processes:  # drop_last: not one batch
        raise ValueError(f"The dataset has {len(dataset)} images, fewer than one global batch ({batch_size} x "
                         f"{num_processes} process(es)): lower --per_device_batch_size.")
    wrapper_kwargs = dict(image_column=image_column, transform=transform, seed=seed, num_channels=num_channels,
                          mask_ratio=mask_ratio, num_patches=num_patches)
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):  # map-style
        train_dataset = PretrainingImageDataset(dataset, **wrapper_kwargs)
        sampler = EpochShuffleSampler(len(train_dataset), seed=seed)
    else:
        train_dataset, sampler = PretrainingIterableDataset(dataset, **wrapper_kwargs), None
    return torch.utils.data.DataLoader(
        train_dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        collate_fn=PretrainingCollator(num_channels, image_size, num_patches), pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


__all__ = [
    "EpochShuffleSampler",
    "IMAGE_COLUMN_CANDIDATES",
    "PretrainingCollator",
    "PretrainingImageDataset",
    "PretrainingIterableDataset",
    "UNREADABLE_KEY",
    "dataset_identity",
    "pretraining_dataloader",
    "pretraining_images",
    "random_patch_mask",
    "sample_seed",
    "select_readable",
    "skipped_file_keys",
    "unreadable_file_key",
]
