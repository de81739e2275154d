"""EMA, the torchvision-free input pipeline, and the dataset entry point shared by pretraining and fine-tuning."""

import numpy as np
import pytest
import torch
from PIL import Image

from nepa_hf import NepaConfig, NepaModel
from nepa_hf.data import load_image_dataset, resolve_column
from nepa_hf.ema import ModelEMA
from nepa_hf.transforms import (
    BatchAugment,
    RandomResizedCropTransform,
    ResizeTransform,
    random_resized_crop_box,
    to_rgb,
)


def micro_model():
    return NepaModel(NepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, patch_size=4, image_size=8))


def test_ema_update_matches_formula_and_round_trips(tmp_path):
    model = micro_model()
    ema = ModelEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.shadow[name], 0.9 * before[name] + 0.1 * value)
    ema.save(tmp_path / "ema.safetensors")
    other = ModelEMA(micro_model(), decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert other.decay == 0.9 and other.num_updates == 1
    for name in ema.shadow:
        assert torch.equal(other.shadow[name], ema.shadow[name])
    # Swapping in and out restores the online weights exactly.
    online = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into(model):
        assert torch.equal(model.norm.weight, ema.shadow["norm.weight"])
    for name, value in model.state_dict().items():
        assert torch.equal(value, online[name])
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.5)


def test_random_resized_crop_box_respects_scale_and_ratio():
    torch.manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(100, 150, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 150
        assert 0.08 * 15000 * 0.9 <= h * w <= 15000
    # Impossible ratio for a very wide image falls back to a centre crop clamped to the ratio range.
    top, left, h, w = random_resized_crop_box(10, 1000, (0.99, 1.0), (1.0, 1.0))
    assert (h, w) == (10, 10) and left == (1000 - 10) // 2


def test_train_and_eval_transforms_give_uint8_rgb(photo_images):
    torch.manual_seed(0)
    crop = RandomResizedCropTransform(32, hflip_prob=0.5)
    out = crop(photo_images[0])
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
    gray = Image.fromarray((np.arange(28 * 28) % 256).reshape(28, 28).astype(np.uint8))
    assert crop(gray).shape == (3, 32, 32)
    sixteen = Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(np.uint16))
    assert np.asarray(to_rgb(sixteen)).max() > 200  # rescaled, not clipped to white/black
    resized = ResizeTransform(24)(photo_images[1])
    assert resized.shape == (3, 24, 24)
    cropped = ResizeTransform(24, resize_size=28)(photo_images[1])
    assert cropped.shape == (3, 24, 24)


def test_batch_augment_normalizes_and_flips():
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(mean=[0.5] * 3, std=[0.5] * 3, hflip_prob=1.0)
    out = augment(batch)
    expected = (batch.float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(out, expected.flip(-1))
    augment.eval()  # no augmentation in eval mode
    torch.testing.assert_close(augment(batch), expected)


def test_load_image_dataset_sources(tmp_path):
    bundled = load_image_dataset("bundled", split="test", max_samples=50)
    assert len(bundled) == 50 and resolve_column(bundled, None, ["image", "img"], "image") == "image"
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 12), (i * 50, 0, 0)).save(tmp_path / label / f"{i}.png")
    folder = load_image_dataset(str(tmp_path))
    assert len(folder) == 4 and folder.features["label"].names == ["a", "b"]
    with pytest.raises(ValueError, match="column 'pixels' not found"):
        resolve_column(folder, "pixels", ["image"], "image")
    with pytest.raises(ValueError, match="built-in names"):
        load_image_dataset("no-such-org/no-such-dataset-nepa-test")
