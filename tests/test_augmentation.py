"""Batched fine-tuning augmentation: RandAugment ops against PIL, random erasing, Mixup/CutMix soft targets."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from nepa_hf.augmentation import (
    RAND_AUGMENT_OPS,
    AugmentationArguments,
    ClassificationBatchTransform,
    Mixup,
    RandAugment,
    RandomErasing,
    adjust_brightness,
    adjust_color,
    adjust_contrast,
    adjust_sharpness,
    auto_contrast,
    equalize,
    invert,
    posterize,
    rotate,
    shear_x,
    shear_y,
    smooth_one_hot,
    solarize,
    solarize_add,
    translate_x,
    translate_y,
)

GRAY = (128, 128, 128)


@pytest.fixture(scope="module")
def photo(photo_images):
    return photo_images[1].resize((64, 48))


def as_batch(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0


def gray_levels_off(ours: torch.Tensor, reference: Image.Image) -> tuple[float, float]:
    diff = (ours[0] - as_batch(reference)[0]).abs() * 255
    return diff.mean().item(), diff.max().item()


def one(value) -> torch.Tensor:
    return torch.tensor([float(value)])


def test_pixel_ops_match_pil(photo):
    x = as_batch(photo)
    lut = [min(255, i + 50) if i < 128 else i for i in range(256)] * 3
    exact = {
        "invert": (invert(x), ImageOps.invert(photo)),
        "posterize": (posterize(x, one(3)), ImageOps.posterize(photo, 3)),
        "solarize": (solarize(x, one(100)), ImageOps.solarize(photo, 100)),
        "solarize_add": (solarize_add(x, one(50)), photo.point(lut)),
        "equalize": (equalize(x), ImageOps.equalize(photo)),
    }
    for name, (ours, reference) in exact.items():
        assert gray_levels_off(ours, reference)[1] < 0.01, name
    for factor in (0.3, 1.7):
        close = {
            "color": (adjust_color(x, one(factor)), ImageEnhance.Color(photo).enhance(factor)),
            "contrast": (adjust_contrast(x, one(factor)), ImageEnhance.Contrast(photo).enhance(factor)),
            "brightness": (adjust_brightness(x, one(factor)), ImageEnhance.Brightness(photo).enhance(factor)),
            "sharpness": (adjust_sharpness(x, one(factor)), ImageEnhance.Sharpness(photo).enhance(factor)),
        }
        for name, (ours, reference) in close.items():  # PIL rounds to 8 bits at each step
            assert gray_levels_off(ours, reference)[1] <= 1.5, (name, factor)
    assert gray_levels_off(auto_contrast(x), ImageOps.autocontrast(photo))[1] <= 1.0
    # Posterize to 0 bits is black (the old PIL / TF behaviour timm's "increasing" posterize relies on).
    assert posterize(x, one(0)).abs().max() == 0


def test_geometric_ops_match_pil(photo):
    x = as_batch(photo)
    fill = torch.tensor([0.5, 0.5, 0.5])
    width, height = photo.size

    def pil_affine(data):
        return photo.transform(photo.size, Image.AFFINE, data, resample=Image.BILINEAR, fillcolor=GRAY)

    cases = {
        "rotate": (rotate(x, one(25), fill), photo.rotate(25, resample=Image.BILINEAR, fillcolor=GRAY)),
        "shear_x": (shear_x(x, one(0.3), fill), pil_affine((1, 0.3, 0, 0, 1, 0))),
        "shear_y": (shear_y(x, one(-0.3), fill), pil_affine((1, 0, 0, -0.3, 1, 0))),
        "translate_x": (translate_x(x, one(0.3), fill), pil_affine((1, 0, 0.3 * width, 0, 1, 0))),
        "translate_y": (translate_y(x, one(-0.2), fill), pil_affine((1, 0, 0, 0, 1, -0.2 * height))),
    }
    for name, (ours, reference) in cases.items():
        mean_off, _ = gray_levels_off(ours, reference)
        assert mean_off < 1.5, name  # only the resampling at the fill border differs
    # The direction matters: rotating the other way is far off.
    assert gray_levels_off(rotate(x, one(-25), fill), photo.rotate(25, resample=Image.BILINEAR, fillcolor=GRAY))[0] > 10


def test_rand_augment_batches_per_image_and_is_identity_in_eval():
    torch.manual_seed(0)
    augment = RandAugment.from_config_str("rand-m9-mstd0.5-inc1")
    assert (augment.num_ops, augment.magnitude, augment.magnitude_std, augment.prob, augment.increasing) == (
        2, 9.0, 0.5, 0.5, True)
    images = torch.rand(64, 3, 16, 16)
    out = augment(images)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    changed = (out - images).abs().flatten(1).amax(1) > 1e-6
    # each image is left alone only when neither of its 2 ops fired (p = 0.25 each), so roughly 3/4 change
    assert 0.5 < changed.float().mean() < 0.95
    assert torch.equal(augment.eval()(images), images)
    for name in RAND_AUGMENT_OPS:
        result = augment.apply_op(name, images[:4], torch.full((4,), 0.9))
        assert result.shape == (4, 3, 16, 16) and 0 <= result.min() and result.max() <= 1 + 1e-6, name
    with pytest.raises(ValueError, match="Unknown RandAugment config section"):
        RandAugment.from_config_str("rand-m9-foo1")
    with pytest.raises(ValueError, match="start with 'rand'"):
        RandAugment.from_config_str("augmix-m5")


def test_random_erasing_boxes_and_noise():
    torch.manual_seed(0)
    erasing = RandomErasing(prob=1.0)
    boxes = erasing.sample_boxes(2000, 32, 32)
    top, left, h, w = boxes.unbind(1)
    assert (h > 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / (32 * 32)
    assert area.min() >= 0.02 * 0.5 and area.max() <= 1 / 3 * 1.3  # U(0.02, 1/3) up to rounding
    aspect = h.float() / w.float()
    assert aspect.min() >= 0.3 * 0.7 and aspect.max() <= 1 / 0.3 * 1.4
    images = torch.zeros(400, 3, 32, 32)
    erased = RandomErasing(prob=0.25)(images)
    fraction = ((erased != 0).flatten(1).any(1)).float().mean().item()
    assert 0.18 < fraction < 0.32
    touched = erased[(erased != 0).flatten(1).any(1)]
    assert abs(touched[touched != 0].std().item() - 1.0) < 0.1  # per-pixel N(0, 1) noise
    assert torch.equal(RandomErasing(prob=1.0).eval()(images), images)


def test_smooth_one_hot():
    targets = smooth_one_hot(torch.tensor([2, 0]), 4, smoothing=0.1)
    torch.testing.assert_close(targets[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))
    torch.testing.assert_close(targets.sum(1), torch.ones(2))


def constant_batch(batch: int, size: int = 16) -> torch.Tensor:
    return torch.arange(batch, dtype=torch.float32).view(-1, 1, 1, 1).expand(batch, 3, size, size).clone()


def test_cutmix_soft_targets_match_box_area():
    torch.manual_seed(0)
    cutmix = Mixup(num_classes=8, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0)
    labels = torch.arange(8)
    for _ in range(20):
        images, targets = cutmix(constant_batch(8), labels)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        for i in range(8):
            own = (images[i] == i).float().mean().item()
            partner = 7 - i
            if partner == i:
                continue
            assert math.isclose(targets[i, i].item(), own, abs_tol=1e-6)
            assert math.isclose(targets[i, partner].item(), 1 - own, abs_tol=1e-6)


def test_mixup_blends_images_and_targets_with_smoothing():
    torch.manual_seed(1)
    mixup = Mixup(num_classes=8, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    labels = torch.arange(8)
    images, targets = mixup(constant_batch(8), labels)
    lam = (images[0, 0, 0, 0].item() - 7) / (0 - 7)  # image 0 = lam * 0 + (1 - lam) * 7
    for i in range(8):
        assert math.isclose(images[i, 0, 0, 0].item(), lam * i + (1 - lam) * (7 - i), abs_tol=1e-5)
    expected = smooth_one_hot(labels, 8, 0.1) * lam + smooth_one_hot(labels.flip(0), 8, 0.1) * (1 - lam)
    torch.testing.assert_close(targets, expected)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    assert targets.min() > 0  # smoothing leaves no zero


def test_mixup_switches_between_mixup_and_cutmix():
    torch.manual_seed(0)
    mixer = Mixup(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = [mixer.sample_params()[1] for _ in range(400)]
    assert 0.4 < np.mean(kinds) < 0.6
    with pytest.raises(ValueError, match="integer class labels"):
        mixer(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 4\)"):
        mixer(torch.zeros(2, 3, 4, 4), torch.tensor([0, 4]))


def test_classification_batch_transform_train_and_eval():
    torch.manual_seed(0)
    transform = AugmentationArguments().batch_transform([0.5] * 3, [0.5] * 3, num_labels=10, label_smoothing=0.1)
    assert transform.mixup.label_smoothing == 0.1 and transform.rand_augment is not None
    pixels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(8)
    batch = transform({"pixel_values": pixels, "labels": labels})
    assert batch["pixel_values"].dtype == torch.float32 and batch["labels"].shape == (8, 10)
    torch.testing.assert_close(batch["labels"].sum(1), torch.ones(8))
    transform.eval()
    batch = transform({"pixel_values": pixels, "labels": labels})
    torch.testing.assert_close(batch["pixel_values"], pixels.float() / 255 * 2 - 1)
    assert torch.equal(batch["labels"], labels)
    with pytest.raises(ValueError, match="look already normalised"):
        transform({"pixel_values": pixels.float() / 255 * 2 - 1})


def test_augmentation_arguments_switches():
    args = AugmentationArguments(rand_augment="none", random_erasing_prob=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    transform = args.batch_transform([0.5] * 3, [0.5] * 3, num_labels=3, label_smoothing=0.0)
    assert transform.rand_augment is None and transform.random_erasing is None and transform.mixup is None
    assert isinstance(transform, ClassificationBatchTransform)
    assert args.eval_resize_size(224) == 256 and AugmentationArguments(eval_crop_pct=1.0).eval_resize_size(224) is None
    crop = args.train_sample_transform(32)
    assert crop(Image.new("L", (28, 28), 100)).shape == (3, 32, 32)
