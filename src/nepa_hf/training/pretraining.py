# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Reusable pieces of NEPA pretraining (reference §4 and §8), used by `examples/pretrain_nepa.py`.

- Data: `PretrainingImageDataset` / `PretrainingIterableDataset` decode and crop one image at a time in DataLoader
  workers and return an `{"unreadable": key}` marker for unreadable or truncated files (key: the row index, or a
  hash of the file's path or bytes when streaming); `PretrainingCollator` turns those into flagged placeholder rows
  (`valid == False`, the key in `unreadable_keys`) so batches keep their shape (Accelerate can dispatch them) and
  which files were skipped travels with the batch across workers and processes (counted once per file however
  often it is read); `select_readable` drops them on the device, and `readable_loss_weight` weights each process's
  loss so that the gradient is the mean over the readable images of all processes.
  The transform is the authors' (`nepa_hf.data.transforms.pretraining_transform`: torchvision RandomResizedCrop + flip +
  normalise). Per-sample randomness (crop, flip, input mask) runs under a seed made from (seed, epoch, index), so
  the augmented data do not depend on the number of workers or processes, nor on where a run was resumed.
- Objective: `NepaPretrainingObjective` wraps `NepaForPreTraining` and optionally adds the hybrid next-patch pixel
  loss of timm's NEPA task through a small MLP `NepaPixelDecoder`; `random_patch_mask` for input masking.
- Recipe: AdamW parameter groups with weight decay on everything but biases, norms and LayerScale (the CLS token
  and the patch embedding are decayed; `pretraining_param_groups`, rule in `nepa_hf.training.weight_decay`), lr = base x
  global batch / 256 (`scaled_learning_rate`), linear warmup then cosine to 0 (`warmup_cosine_schedule`).
- Monitoring: `CollapseMonitor` (spread of the predicted embeddings), `JsonlTracker` (an Accelerate tracker that
  writes one JSON object per logged step, always available offline).
- Checkpoints: `save_checkpoint` writes `accelerator.save_state` into a temporary folder and renames it into place,
  so a kill during a save leaves the previous checkpoint intact; `latest_checkpoint` finds the newest complete one;
  `resume_checkpoint` also checks that every file loads (`verify_checkpoint`), falling back past damaged ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.utils import ModelOutput

from ..data.transforms import array_to_image, seeded, to_rgb
from .weight_decay import NO_WEIGHT_DECAY_NAMES, decays_in_pretraining, weight_decay_flags

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def sample_seed(seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed from a base seed and integer keys (e.g. epoch and sample index)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)]).generate_state(
        2, dtype=np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


def decode_image(value) -> Image.Image:
    """Decode one dataset value into a fully loaded PIL image.

    Accepts a PIL image, a `datasets.Image(decode=False)` dict (`{"bytes", "path"}`), raw bytes, a file path or an
    HxW[xC] array (uint16 arrays scaled to 8 bits by the image processor's rule, `transforms.array_to_image`). The
    pixels are read here (`Image.load()`), so truncated files fail now rather than later.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        if value.get("bytes") is None and not value.get("path"):
            raise ValueError("image entry has neither bytes nor a path")
        from datasets import Image as ImageFeature

        image = ImageFeature().decode_example(value)  # handles local, archive and remote paths
    elif isinstance(value, (bytes, bytearray)):
        import io

        image = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, os.PathLike)):
        image = Image.open(value)
    elif isinstance(value, np.ndarray):
        image = array_to_image(value)
    else:
        raise TypeError(f"Cannot decode an image from a {type(value).__name__}.")
    image.load()
    return image


def _describe(value, where) -> str:
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    return f"{where}" + (f" ({path})" if path else "")


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
UNKNOWN_FILE = -1  # key of an unreadable sample that names no file (counted each time it is read)


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
    the sample's seed; `{"unreadable": key}` when unreadable."""

    max_warnings = 10

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
        self.num_failures = 0  # per worker copy; the batches carry the authoritative count

    def __call__(self, value, seed: int, where, key: int) -> dict:
        try:
            image = to_rgb(decode_image(value))  # 16-bit/float sources are rescaled, not clipped
            if self.num_channels == 1:
                image = image.convert("L")
            with seeded(seed):
                pixels = self.transform(image)
                mask = random_patch_mask(1, self.num_patches, self.mask_ratio)[0] if self.mask_ratio else None
        except Exception as error:  # any decoder failure: skip the sample, never stop a long run
            self.num_failures += 1
            if self.num_failures <= self.max_warnings:
                logger.warning(
                    "Skipping unreadable image %s: %s: %s%s", _describe(value, where), type(error).__name__, error,
                    " (further failures in this worker are only counted)" if self.num_failures == self.max_warnings
                    else "",
                )
            return {UNREADABLE_KEY: key}
        sample = {"pixel_values": pixels}
        if mask is not None:
            sample["bool_masked_pos"] = mask
        return sample


def _undecoded(dataset, image_column: str):
    """Switch a `datasets` Image column to decode=False so decoding (and its errors) happens in our wrapper."""
    features = getattr(dataset, "features", None)
    if features is None or image_column not in features:
        return dataset
    from datasets import Image as ImageFeature

    if isinstance(features[image_column], ImageFeature) and features[image_column].decode:
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


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
        self.dataset = _undecoded(dataset, image_column) if image_column is not None else dataset
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
            return self._fail(index, error)
        return self.processor(value, sample_seed(self.processor.seed, epoch, index), f"#{index}", index)

    def _fail(self, index, error) -> dict:
        self.processor.num_failures += 1
        if self.processor.num_failures <= self.processor.max_warnings:
            logger.warning("Skipping unreadable sample #%s: %s: %s", index, type(error).__name__, error)
        return {UNREADABLE_KEY: index}


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
        self.dataset = _undecoded(dataset, image_column) if image_column is not None else dataset
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


def select_readable(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, bool]:
    """Drop the placeholder rows of unreadable images from a collated batch.

    Returns (model inputs: the batch without `valid` and `unreadable_keys`, number of skipped rows, whether every
    row was skipped). When every row was skipped the placeholders are kept so each process still runs a
    forward/backward (DDP needs all processes to take part); `readable_loss_weight` is then 0 for that process.
    """
    valid = batch["valid"]
    inputs = {key: value for key, value in batch.items() if key not in _BOOKKEEPING_KEYS}
    num_skipped = int(valid.numel() - valid.sum().item())
    if num_skipped == 0:
        return inputs, 0, False
    if num_skipped == valid.numel():
        return inputs, num_skipped, True
    return {key: value[valid] for key, value in inputs.items()}, num_skipped, False


def skipped_file_keys(batch: dict[str, torch.Tensor]) -> list[int]:
    """The file keys of a batch's unreadable rows (`UNKNOWN_FILE` for rows that name no file). Reads the device:
    call it only for a batch known to have skipped rows."""
    return batch["unreadable_keys"][~batch["valid"]].tolist()


def readable_loss_weight(valid: torch.Tensor, accelerator) -> torch.Tensor:
    """Factor for one process's mean loss over its readable images so that the gradient DDP averages over processes
    is the gradient of the mean over the readable images of the whole (global) micro-batch, as one process with
    the same global batch computes it: readable_here x num_processes / readable_everywhere.

    Without unreadable images the factor is exactly 1; a process whose images are all unreadable gets 0 (its
    placeholder forward contributes nothing). One scalar all-reduce per micro-batch, on the device (no host sync).
    """
    readable = valid.sum().to(torch.float32)
    everywhere = accelerator.reduce(readable, reduction="sum")
    return readable * accelerator.num_processes / everywhere.clamp(min=1.0)


# --------------------------------------------------------------------------------------------------------------
# Objective: NEPA loss (+ optional hybrid next-patch pixel loss)
# --------------------------------------------------------------------------------------------------------------


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, num_patches, patch_size * patch_size * C), patches row-major like the patch embedding."""
    batch, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation of pixel targets (zero mean, unit variance over each patch's values)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


class NepaPixelDecoder(nn.Module):
    """Small MLP that predicts the next patch's per-patch-normalised pixels from the model output at the
    previous position (timm NEPA's hybrid pixel loss). Used for training only; not part of the saved model.

    Args:
        hidden_size: NEPA hidden size.
        patch_size, num_channels: geometry of the predicted patches.
        decoder_hidden_size: width of the MLP (default: hidden_size).
        loss_type: "mse" or "l1".
    """

    def __init__(self, hidden_size: int, patch_size: int, num_channels: int = 3,
                 decoder_hidden_size: int | None = None, loss_type: str = "mse", initializer_range: float = 0.02):
        super().__init__()
        if loss_type not in ("mse", "l1"):
            raise ValueError(f"pixel loss_type must be 'mse' or 'l1', got {loss_type!r}.")
        self.patch_size = patch_size
        self.loss_type = loss_type
        decoder_hidden_size = decoder_hidden_size or hidden_size
        self.fc1 = nn.Linear(hidden_size, decoder_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(decoder_hidden_size, patch_size * patch_size * num_channels)
        for linear in (self.fc1, self.fc2):
            nn.init.trunc_normal_(linear.weight, std=initializer_range)
            nn.init.zeros_(linear.bias)

    def forward(self, hidden_states: torch.Tensor, pixel_values: torch.Tensor, shift: bool = True) -> torch.Tensor:
        """Pixel loss for NEPA outputs `hidden_states` (B, 1 + N, D) of the images `pixel_values` (B, C, H, W).

        With `shift`, output t (CLS = 0) predicts patch t + 1, i.e. outputs 0..N-1 predict patches 1..N; without
        it each patch output predicts its own patch (the same-position ablation).
        """
        targets = normalize_patches(patchify(pixel_values.float(), self.patch_size))
        inputs = hidden_states[:, :-1] if shift else hidden_states[:, 1:]
        predictions = self.fc2(self.act(self.fc1(inputs))).float()
        if self.loss_type == "l1":
            return F.l1_loss(predictions, targets)
        return F.mse_loss(predictions, targets)


@dataclass
class NepaPretrainingObjectiveOutput(ModelOutput):
    """Output of `NepaPretrainingObjective`.

    Args:
        loss: the training loss, `embedding_loss + pixel_loss_weight * pixel_loss`.
        embedding_loss: NEPA's negative cosine next-embedding loss.
        pixel_loss: the hybrid pixel loss (None without a pixel decoder).
        last_hidden_state: the predictions `(batch, 1 + num_patches, hidden)`.
        input_embeddings: the targets.
    """

    loss: torch.FloatTensor | None = None
    embedding_loss: torch.FloatTensor | None = None
    pixel_loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    input_embeddings: torch.FloatTensor | None = None


class NepaPretrainingObjective(nn.Module):
    """`NepaForPreTraining` plus the optional hybrid pixel loss, as one module to hand to `accelerator.prepare`.

    The NEPA loss and its ablations (shift, stop-gradient, causal mask, input masking) come from the model's config;
    `pixel_loss_weight > 0` adds `NepaPixelDecoder`'s loss with that weight. Save `objective.model` with
    `save_pretrained`; the pixel decoder is a training-only head.
    """

    def __init__(self, model: nn.Module, pixel_loss_weight: float = 0.0, pixel_loss_type: str = "mse",
                 pixel_decoder_hidden_size: int | None = None):
        super().__init__()
        if pixel_loss_weight < 0:
            raise ValueError(f"pixel_loss_weight must be >= 0, got {pixel_loss_weight}.")
        self.model = model
        self.pixel_loss_weight = pixel_loss_weight
        config = model.config
        self.pixel_decoder = (
            NepaPixelDecoder(config.hidden_size, config.patch_size, config.num_channels, pixel_decoder_hidden_size,
                             pixel_loss_type, config.initializer_range)
            if pixel_loss_weight > 0 else None
        )
        # FSDP's transformer auto-wrap policy reads these from the root module.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    @property
    def config(self):
        return self.model.config

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None,
                **kwargs) -> NepaPretrainingObjectiveOutput:
        outputs = self.model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
        loss, pixel_loss = outputs.loss, None
        if self.pixel_decoder is not None:
            # Pixel targets stay clean whatever the input masking, like the embedding targets.
            pixel_loss = self.pixel_decoder(outputs.last_hidden_state, pixel_values,
                                            shift=self.model.config.pretraining_shift)
            loss = loss + self.pixel_loss_weight * pixel_loss
        return NepaPretrainingObjectiveOutput(
            loss=loss, embedding_loss=outputs.loss, pixel_loss=pixel_loss,
            last_hidden_state=outputs.last_hidden_state, input_embeddings=outputs.input_embeddings,
        )


# --------------------------------------------------------------------------------------------------------------
# Recipe: optimizer groups, learning rate, schedule
# --------------------------------------------------------------------------------------------------------------

def no_weight_decay(name: str, parameter: torch.Tensor | None = None, in_norm_module: bool = False) -> bool:
    """True for a parameter the reference pretraining keeps free of weight decay: biases, norms (and any parameter of
    a LayerNorm module, `in_norm_module`), LayerScale. Learned tokens and the patch embedding ARE decayed. The rule
    lives in `nepa_hf.training.weight_decay` (one rule for pretraining and fine-tuning); `parameter` is not needed."""
    return not decays_in_pretraining(name, in_norm_module)


def pretraining_param_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    """Two AdamW groups of the reference pretraining recipe (`nepa_hf.training.weight_decay.weight_decay_flags`): every
    parameter with `weight_decay` (CLS/mask token, patch embedding, linear weights) except biases, norms and
    LayerScale, which get none. Frozen parameters are left out."""
    flags = weight_decay_flags(model)
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (decay if flags[name] else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def create_pretraining_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.05,
                                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with the reference betas (0.9, 0.95) over `pretraining_param_groups`."""
    return torch.optim.AdamW(pretraining_param_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps)


def scaled_learning_rate(base_learning_rate: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """The linear scaling rule of the reference: lr = base_lr x global batch / 256."""
    return base_learning_rate * global_batch_size / reference_batch_size


def warmup_steps_for(num_training_steps: int, warmup_ratio: float) -> int:
    """Number of warmup steps for a ratio of the run (at least 1 when the ratio is positive)."""
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
    return max(1, math.ceil(warmup_ratio * num_training_steps)) if warmup_ratio > 0 else 0


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, num_training_steps: int, num_warmup_steps: int,
                           min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over `num_warmup_steps`, then cosine decay to `min_lr_ratio` x peak at the last step
    (the reference: 2.5% warmup, cosine to 0). Step it once per optimizer update."""
    if num_training_steps <= 0:
        raise ValueError(f"num_training_steps must be positive, got {num_training_steps}.")

    def factor(step: int) -> float:
        if step < num_warmup_steps:
            return step / num_warmup_steps
        progress = min(1.0, (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------------------
# Collapse monitor
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def embedding_spread(embeddings: torch.Tensor) -> float:
    """sqrt(D) x the mean per-dimension std of the L2-normalised embeddings, pooled over images and tokens.

    About 1 for directions spread evenly over the sphere, 0 when every embedding points the same way (collapse).
    """
    flat = F.normalize(embeddings.detach().float().reshape(-1, embeddings.shape[-1]), dim=-1)
    if flat.shape[0] < 2:
        return float("nan")
    return (flat.std(dim=0, unbiased=False).mean() * math.sqrt(flat.shape[-1])).item()


@torch.no_grad()
def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct embeddings (images x tokens); 1 when collapsed."""
    flat = F.normalize(embeddings.detach().float().reshape(-1, embeddings.shape[-1]), dim=-1)
    count = flat.shape[0]
    if count < 2:
        return float("nan")
    total = flat.sum(dim=0)
    return ((total @ total - count) / (count * (count - 1))).item()


class CollapseMonitor:
    """Tracks the spread of NEPA's predicted embeddings and warns when it heads to zero.

    Without stop-gradient NEPA collapses: every patch maps to one vector and the loss reaches -1, which looks like a
    great loss. Call it on `last_hidden_state`; it returns `embedding_spread` and `mean_cosine` for logging and
    logs a warning when the spread falls below `min_spread` (or below `relative_drop` x the highest seen).
    """

    def __init__(self, min_spread: float = 0.05, relative_drop: float = 0.02):
        self.min_spread = min_spread
        self.relative_drop = relative_drop
        self.peak = 0.0
        self.collapsed = False

    def __call__(self, predictions: torch.Tensor) -> dict[str, float]:
        spread = embedding_spread(predictions)
        cosine = mean_pairwise_cosine(predictions)
        if math.isfinite(spread):
            self.peak = max(self.peak, spread)
            collapsed = spread < self.min_spread or spread < self.relative_drop * self.peak
            if collapsed and not self.collapsed:
                logger.warning(
                    "Representation collapse: the spread of the predicted embeddings fell to %.4f (peak %.4f; mean "
                    "pairwise cosine %.4f). The NEPA loss is then near -1 without the model learning anything; is "
                    "stop-gradient off (--no-stop-grad) or the learning rate too high?", spread, self.peak, cosine,
                )
            self.collapsed = collapsed
        return {"embedding_spread": spread, "mean_cosine": cosine}


# --------------------------------------------------------------------------------------------------------------
# JSON-lines tracker
# --------------------------------------------------------------------------------------------------------------

try:
    from accelerate.tracking import GeneralTracker
except ImportError:  # pragma: no cover - accelerate is a dependency
    GeneralTracker = object


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


class JsonlTracker(GeneralTracker):
    """Accelerate tracker writing one JSON object per `accelerator.log` call to a local file (e.g. `metrics.jsonl`),
    with the step under `"step"`; the run configuration goes to `run_config.json` beside it.

    Args:
        path: the `.jsonl` file.
        resume_step: when resuming, records after this step (written by the interrupted run past its last checkpoint)
            are dropped so the file reads as one uninterrupted run; None starts a fresh file.
    """

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.resume_step = resume_step
        self._file = None

    @property
    def tracker(self):
        return self._file

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) <= self.resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
            self._file = open(self.path, "a")
        else:
            self._file = open(self.path, "w")

    def store_init_configuration(self, values: dict):
        config_path = self.path.with_name("run_config.json")
        config_path.write_text(json.dumps({k: _jsonable(v) for k, v in values.items()}, indent=2, default=str) + "\n")

    def log(self, values: dict, step: int | None = None, **kwargs):
        if self._file is None:
            self.start()
        record = {"step": step} if step is not None else {}
        record.update({key: _jsonable(value) for key, value in values.items()})
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def finish(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (e.g. a run's `metrics.jsonl`)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# --------------------------------------------------------------------------------------------------------------

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_META = "meta.json"
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".deleting-"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def list_checkpoints(checkpoints_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints `checkpoint-<step>` (with their `meta.json`) under `checkpoints_dir`, oldest first.
    Temporary folders of interrupted saves are ignored."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX) and (child / CHECKPOINT_META).is_file():
            suffix = child.name[len(CHECKPOINT_PREFIX):]
            if suffix.isdigit():
                found.append((int(suffix), child))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `checkpoints_dir`, or None."""
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1][1] if checkpoints else None


def read_checkpoint_meta(checkpoint_dir: str | os.PathLike) -> dict:
    """The `meta.json` (training position) of a checkpoint written by `save_checkpoint`."""
    path = Path(checkpoint_dir) / CHECKPOINT_META
    if not path.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a complete checkpoint: it has no {CHECKPOINT_META}. Pass a "
            f"'{CHECKPOINT_PREFIX}<step>' folder written by this script, or 'latest'."
        )
    return json.loads(path.read_text())


class CheckpointLoadError(ValueError):
    """A file of a checkpoint does not load (truncated or corrupt); the message names the file."""


# How `verify_checkpoint` loads each kind of file a checkpoint holds (`accelerator.save_state` plus meta.json).
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


def verify_checkpoint(checkpoint_dir: str | os.PathLike) -> None:
    """Load every file of a checkpoint folder once (safetensors, torch/pickle files, JSON) and raise a
    `CheckpointLoadError` naming the first one that does not load, e.g. a file truncated by a full disk or a copy cut
    short. Files of other kinds (e.g. sharded FSDP states) are not checked. The files are the run's own, loaded as
    `accelerator.load_state` loads them."""
    from safetensors.torch import load_file

    root = Path(checkpoint_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            if path.suffix == ".safetensors":
                load_file(path)
            elif path.suffix in _TORCH_SUFFIXES:
                torch.load(path, map_location="cpu", weights_only=False)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as error:
            raise CheckpointLoadError(
                f"{path} does not load ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                "the checkpoint is damaged (truncated or corrupt file)."
            ) from error


def resume_checkpoint(checkpoints_dir: str | os.PathLike, requested: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from, verified (`verify_checkpoint`).

    `requested == "latest"`: the newest complete checkpoint under `checkpoints_dir` whose files all load; a damaged
    one is skipped with a warning naming the bad file, and the previous one is tried. None when there is no
    checkpoint; a `CheckpointLoadError` when there are only damaged ones. A named checkpoint folder must load
    entirely: a damaged file is a `CheckpointLoadError` naming it (`read_checkpoint_meta`'s error when it is not a
    checkpoint at all).
    """
    if str(requested) != "latest":
        read_checkpoint_meta(requested)
        try:
            verify_checkpoint(requested)
        except CheckpointLoadError as error:
            raise CheckpointLoadError(
                f"Cannot resume from {requested}: {error} Resume from an earlier checkpoint, or pass "
                "--resume_from_checkpoint latest to use the newest one that loads."
            ) from error
        return Path(requested)
    damaged = []
    for _, checkpoint in reversed(list_checkpoints(checkpoints_dir)):
        try:
            verify_checkpoint(checkpoint)
        except CheckpointLoadError as error:
            logger.warning("Skipping damaged checkpoint %s: %s Trying the previous one.", checkpoint, error)
            damaged.append(str(error))
            continue
        return checkpoint
    if damaged:
        raise CheckpointLoadError(
            f"No checkpoint under {checkpoints_dir} loads: {' '.join(damaged)} Start afresh with "
            "--overwrite_output_dir (deletes them)."
        )
    return None


def _remove(path: Path) -> None:
    """Delete a folder by first renaming it out of the checkpoint namespace, so a kill mid-delete never leaves a
    half-deleted folder that looks like a checkpoint."""
    trash = path.with_name(_TRASH_PREFIX + path.name)
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, checkpoints_dir: str | os.PathLike, step: int, meta: dict | None = None,
                    total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `checkpoints_dir/checkpoint-<step>`, atomically. Call on every process.

    The state is written to a temporary folder, `meta.json` (the training position, written last) is added, and
    only then is the folder renamed into place; older checkpoints beyond `total_limit` are deleted afterwards.
    A kill at any point leaves the previous checkpoint untouched and `latest_checkpoint` ignores the partial one.
    Assumes the main process can see every process's files (a shared filesystem on multi-node runs, as
    `save_state` itself does).
    """
    root = Path(checkpoints_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    temporary = root / f"{_TEMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for child in root.iterdir():  # leftovers of interrupted saves or deletions
            if child.is_dir() and child.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta_path = temporary / CHECKPOINT_META
        with open(meta_path, "w") as handle:
            json.dump({"step": step, **(meta or {})}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(temporary)
        if final.exists():  # re-saving a step (e.g. after resuming from it)
            _remove(final)
        os.replace(temporary, final)
        _fsync_dir(root)
        if total_limit is not None and total_limit > 0:
            for _, old in list_checkpoints(root)[:-total_limit]:
                _remove(old)
    accelerator.wait_for_everyone()
    return final


__all__ = [
    "CHECKPOINT_META",
    "CHECKPOINT_PREFIX",
    "CheckpointLoadError",
    "CollapseMonitor",
    "EpochShuffleSampler",
    "JsonlTracker",
    "NO_WEIGHT_DECAY_NAMES",
    "NepaPixelDecoder",
    "NepaPretrainingObjective",
    "NepaPretrainingObjectiveOutput",
    "PretrainingCollator",
    "PretrainingImageDataset",
    "PretrainingIterableDataset",
    "UNKNOWN_FILE",
    "UNREADABLE_KEY",
    "create_pretraining_optimizer",
    "decode_image",
    "embedding_spread",
    "latest_checkpoint",
    "list_checkpoints",
    "mean_pairwise_cosine",
    "no_weight_decay",
    "normalize_patches",
    "patchify",
    "pretraining_param_groups",
    "random_patch_mask",
    "read_checkpoint_meta",
    "read_jsonl",
    "sample_seed",
    "save_checkpoint",
    "scaled_learning_rate",
    "readable_loss_weight",
    "resume_checkpoint",
    "select_readable",
    "skipped_file_keys",
    "unreadable_file_key",
    "verify_checkpoint",
    "warmup_cosine_schedule",
    "warmup_steps_for",
]
