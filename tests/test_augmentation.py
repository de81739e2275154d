"""The training data stack: torchvision v2 pretraining crops and timm fine-tuning augmentation, as the authors run
them; per-sample seeding; Mixup in the collator; the 16-bit rule shared with the image processor."""

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from torchvision import transforms as T
from torchvision.transforms import v2

from nepa_hf.augmentation import AugmentationArguments, MixupCollator
from nepa_hf.classification_data import MIXABLE_KEY, collate_image_batch
from nepa_hf.image_processing_nepa import NepaImageProcessor
from nepa_hf.transforms import ImageProcessorTransform, pretraining_transform, seeded, to_rgb

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def photo(photo_images):
    return photo_images[1]


def test_pretraining_transform_is_the_authors_torchvision_pipeline(photo):
    transform = pretraining_transform(48, MEAN, STD)
    crop = transform.transforms[0]
    assert isinstance(crop, v2.RandomResizedCrop)
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == v2.InterpolationMode.BILINEAR
    # The authors' code: torchvision RandomResizedCrop(size) with its defaults, flip, ToTensor, Normalize.
    authors = T.Compose([T.RandomResizedCrop(48), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    rgb = to_rgb(photo)
    for seed in range(10):
        with seeded(seed):
            ours = transform(rgb)
        with seeded(seed):
            theirs = authors(rgb)
        assert ours.dtype == torch.float32 and ours.shape == (3, 48, 48)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)  # 1/255 vs x/255 rounding only


def test_seeded_is_reproducible_and_restores_the_callers_random_streams(photo):
    transform = AugmentationArguments().train_transform(32, MEAN, STD)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with seeded(123):
        first = transform(photo)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    with seeded(123):
        again = transform(photo)
    with seeded(124):
        other = transform(photo)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_finetuning_transform_is_timms_create_transform(photo):
    """The defaults are the authors' timm call, and the transform is timm's own (same output under the same seed)."""
    ours = AugmentationArguments().train_transform(32, MEAN, STD)
    theirs = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                              re_prob=0.25, re_mode="pixel", re_count=1, mean=MEAN, std=STD)
    names = [type(t).__name__ for t in ours.transform.transforms]
    assert names == [type(t).__name__ for t in theirs.transforms]
    assert "RandAugment" in names and "RandomErasing" in names and "ColorJitter" not in names
    for seed in range(5):
        with seeded(seed):
            a = ours(photo)
        with seeded(seed):
            b = theirs(photo)
        assert torch.equal(a, b) and a.shape == (3, 32, 32)
    # Any PIL mode works: grayscale, RGBA and 16-bit images become RGB first.
    gray = Image.fromarray((np.arange(28 * 28) % 256).reshape(28, 28).astype(np.uint8))
    rgba = photo.convert("RGBA")
    sixteen = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    for image in (gray, rgba, sixteen):
        assert ours(image).shape == (3, 32, 32)


def test_flags_switch_each_piece_off():
    args = AugmentationArguments(rand_augment="none", random_erasing_prob=0.0, hflip_prob=0.0, mixup_alpha=0.0,
                                 cutmix_alpha=0.0, crop_scale_min=0.5)
    names = [type(t).__name__ for t in args.train_transform(32, MEAN, STD).transform.transforms]
    assert "RandAugment" not in names and "RandomErasing" not in names and "RandomHorizontalFlip" not in names
    assert "ColorJitter" in names  # timm's colour jitter comes back without RandAugment, as in timm
    assert args.train_transform(32, MEAN, STD).transform.transforms[0].scale == (0.5, 1.0)
    assert args.collator(10, label_smoothing=0.1) is collate_image_batch  # no mixing: integer labels
    with pytest.raises(ValueError, match="crop_scale_min"):
        AugmentationArguments(crop_scale_min=0.0)
    with pytest.raises(ValueError, match="interpolation"):
        AugmentationArguments(interpolation="cubic")


def test_eval_processor_is_resize_256_bicubic_centre_crop_224(photo):
    processor = AugmentationArguments().eval_image_processor(224, MEAN, STD)
    assert isinstance(processor, NepaImageProcessor)
    assert processor.size.shortest_edge == 256 and processor.do_center_crop
    assert (processor.crop_size.height, processor.crop_size.width) == (224, 224) and processor.resample == 3
    pixels = ImageProcessorTransform(processor)(photo)
    # torchvision's Resize(256, bicubic) + CenterCrop(224) + ToTensor + Normalize on the PIL image.
    reference = T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(MEAN, STD)])(photo.convert("RGB"))
    assert pixels.shape == (3, 224, 224)
    # The processor resizes tensors (antialiased bicubic), the reference PIL images: a few grey levels apart.
    assert (pixels - reference).abs().mean() < 0.01
    straight = AugmentationArguments(eval_crop_pct=1.0).eval_image_processor(32, MEAN, STD)
    assert (straight.size.height, straight.size.width) == (32, 32) and not straight.do_center_crop


def examples(count, mixable=True, num_labels=10):
    generator = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, 8, 8, generator=generator), "labels": i % num_labels} for i in range(count)]
    if mixable:
        for row in rows:
            row[MIXABLE_KEY] = True
    return rows


def test_mixup_collator_mixes_training_batches_into_smoothed_soft_targets():
    collator = AugmentationArguments().collator(10, label_smoothing=0.1)
    assert isinstance(collator, MixupCollator)
    mixup = collator.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode) == (
        0.8, 1.0, 1.0, 0.5, "batch")
    rows = examples(8)
    np.random.seed(0)
    batch = collator(rows)
    targets = batch["labels"]
    assert targets.shape == (8, 10) and targets.dtype == torch.float32
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing puts eps / C on every class
    assert not torch.equal(batch["pixel_values"], torch.stack([r["pixel_values"] for r in rows]))
    # Each target mixes the sample's own class with its partner in the flipped batch (timm's "batch" mode).
    top2 = targets.topk(2, dim=1).indices
    for i, row in enumerate(rows):
        assert set(top2[i].tolist()) == {row["labels"], rows[7 - i]["labels"]}


def test_mixup_collator_leaves_evaluation_batches_alone_and_drops_an_odd_sample(caplog):
    collator = AugmentationArguments().collator(10, label_smoothing=0.1)
    rows = examples(5, mixable=False)
    batch = collator(rows)
    assert batch["labels"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(batch["pixel_values"], torch.stack([r["pixel_values"] for r in rows]))
    with caplog.at_level(logging.WARNING):
        mixed = collator(examples(5))
    assert mixed["labels"].shape == (4, 10) and "even batch" in caplog.text


def test_collate_refuses_unnormalised_integer_pixels():
    rows = [{"pixel_values": torch.zeros(3, 4, 4, dtype=torch.uint8), "labels": 0}] * 2
    with pytest.raises(ValueError, match="not normalised floats"):
        collate_image_batch(rows)


def test_16_bit_images_follow_the_image_processor_rule():
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 255, 128]  # value / 257, rounded
    assert np.array_equal(np.asarray(to_rgb(values)), rgb)  # uint16 arrays too
