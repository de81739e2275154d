"""The authors' fine-tuning augmentation, from timm: `create_transform` per sample, `Mixup` per batch.

Per sample (DataLoader workers): timm `create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1, mean/std of the processor)`, i.e.
RandomResizedCrop + flip + RandAugment + normalise + random erasing (timm turns colour jitter off while RandAugment
is on). Per batch: timm `Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
label_smoothing=0.1)` in the collator (`MixupCollator`), so a plain `Trainer` gets it too; the labels become soft
targets, which NEPA classifiers train on with soft-target cross-entropy. Evaluation is the image processor's
resize (shortest edge size / crop_pct, bicubic) + centre crop. `AugmentationArguments` holds every knob as a flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from torchvision.transforms import v2
from transformers.utils import logging

from .classification import MIXABLE_KEY, collate_image_batch, drop_unreadable
from .transforms import INTERPOLATIONS, evaluation_image_processor, to_rgb, translation_crop

logger = logging.get_logger(__name__)


class RGBTransform:
    """Convert any image to 8-bit RGB (`nepa_hf.data.transforms.to_rgb`), then run `transform` (timm wants RGB PIL)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


class MixupCollator:
    """`collate_image_batch`, then timm's Mixup/CutMix on batches of training samples (labels -> soft targets).

    A batch is mixed only when its examples were marked as training samples (`with_image_transform(...,
    mixable=True)`), so the same collator serves the Trainer's evaluation batches unchanged. timm mixes pairs
    within a batch and needs an even size: an odd batch (the last partial batch of an epoch, or one that lost an
    unreadable image) drops its last sample, with a warning, as `drop_last` would; a single remaining sample passes
    unmixed (with the smoothed soft targets). Unreadable images (`pixel_values` None) are dropped first.
    """

    def __init__(self, mixup: Mixup):
        self.mixup = mixup
        self._warned_odd = False

    def __call__(self, examples: list[dict]) -> dict:
        examples = drop_unreadable(examples)  # before the parity check: Mixup pairs the images that remain
        mixable = all(example.get(MIXABLE_KEY, False) for example in examples)
        if mixable and len(examples) % 2 and len(examples) > 1:
            if not self._warned_odd:
                logger.warning(
                    f"Mixup needs an even batch; dropping the last sample of a batch of {len(examples)} (set "
                    "dataloader_drop_last=True or an even per-device batch size that divides the dataset to avoid it)."
                )
                self._warned_odd = True
            examples = examples[:-1]
        batch = collate_image_batch(examples)
        if mixable and "labels" in batch:
            if len(examples) > 1:
                batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
            else:  # nothing to mix with: the same smoothed soft targets as the mixed batches
                batch["labels"] = mixup_target(batch["labels"], self.mixup.num_classes, 1.0,
                                               self.mixup.label_smoothing)
        return batch


@dataclass
class AugmentationArguments:
    """Fine-tuning augmentation flags; the defaults are the authors' recipe."""

    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop minimum area fraction."})
    random_crop_padding: int = field(
        default=0,
        metadata={"help": "N > 0: resize, pad N px and random-crop instead of RandomResizedCrop (a translation by up "
                          "to N px, for 28-32 px images; --crop_scale_min is then unused)."},
    )
    hflip_prob: float = field(default=0.5, metadata={"help": "Horizontal flip probability."})
    interpolation: str = field(default="bicubic", metadata={"help": f"Resampling of crops and eval resizes: {INTERPOLATIONS}."})
    rand_augment: str | None = field(
        default="rand-m9-mstd0.5-inc1", metadata={"help": "timm RandAugment config string; 'none' disables it."}
    )
    color_jitter: float = field(
        default=0.4, metadata={"help": "timm colour jitter strength; timm applies it only while RandAugment is off."}
    )
    random_erasing_prob: float = field(default=0.25, metadata={"help": "Random erasing probability (0 disables)."})
    random_erasing_mode: str = field(default="pixel", metadata={"help": "Random erasing fill: pixel, rand or const."})
    random_erasing_count: int = field(default=1, metadata={"help": "Random erasing boxes per image."})
    mixup_alpha: float = field(default=0.8, metadata={"help": "Mixup Beta alpha (0 disables Mixup)."})
    cutmix_alpha: float = field(default=1.0, metadata={"help": "CutMix Beta alpha (0 disables CutMix)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch (0 disables mixing)."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix instead of Mixup."})
    mixup_mode: str = field(default="batch", metadata={"help": "timm Mixup mode: batch, pair or elem."})
    eval_crop_pct: float = field(
        default=0.875,
        metadata={"help": "Eval: resize the short side to size / crop_pct, centre-crop size (1.0: resize straight)."},
    )

    def __post_init__(self):
        if isinstance(self.rand_augment, str) and self.rand_augment.lower() in ("", "none", "off"):
            self.rand_augment = None
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError(f"--crop_scale_min must be in (0, 1], got {self.crop_scale_min}.")
        if self.random_crop_padding < 0:
            raise ValueError(f"--random_crop_padding must be >= 0 pixels, got {self.random_crop_padding}.")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"--eval_crop_pct must be in (0, 1], got {self.eval_crop_pct}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"--interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}.")

    @property
    def mixes(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def train_transform(self, size: int, mean, std) -> RGBTransform:
        """timm's training transform (any image -> normalised float (3, size, size) tensor); with
        `random_crop_padding`, its first stage (RandomResizedCrop + flip) becomes `translation_crop` + flip."""
        crop, colour, final = create_transform(
            input_size=size, is_training=True, scale=(self.crop_scale_min, 1.0), hflip=self.hflip_prob,
            color_jitter=self.color_jitter, auto_augment=self.rand_augment, interpolation=self.interpolation,
            re_prob=self.random_erasing_prob, re_mode=self.random_erasing_mode, re_count=self.random_erasing_count,
            mean=tuple(mean), std=tuple(std), separate=True,
        )
        crop = crop.transforms
        if self.random_crop_padding:
            flip = [v2.RandomHorizontalFlip(self.hflip_prob)] if self.hflip_prob > 0 else []
            crop = [*translation_crop(size, self.random_crop_padding, self.interpolation).transforms, *flip]
        return RGBTransform(v2.Compose([*crop, *colour.transforms, *final.transforms]))

    def eval_image_processor(self, size: int, mean, std):
        """The evaluation preprocessing as an image processor (saved with the model, used by pipelines)."""
        return evaluation_image_processor(size, mean, std, crop_pct=self.eval_crop_pct, interpolation=self.interpolation)

    def collator(self, num_labels: int, label_smoothing: float = 0.0):
        """`MixupCollator` when mixing is on (label smoothing goes into its soft targets), else
        `collate_image_batch` (integer labels; the Trainer's `label_smoothing_factor` then applies)."""
        if not self.mixes:
            return collate_image_batch
        mixup = Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.mixup_prob,
                      switch_prob=self.mixup_switch_prob, mode=self.mixup_mode, label_smoothing=label_smoothing,
                      num_classes=num_labels)
        return MixupCollator(mixup)


__all__ = ["AugmentationArguments", "MixupCollator", "RGBTransform"]
