"""Attention / next-embedding similarity / PCA maps (reference §10) and their PNGs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nepa_hf import NepaConfig, NepaForPreTraining, NepaImageProcessorPil
from nepa_hf.visualization import colorize, compute_maps, pca_to_rgb, save_visualizations

REPO = Path(__file__).resolve().parents[1]


def make_model():
    torch.manual_seed(0)
    config = NepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=8, image_size=32, layerscale_value=1.0, qk_norm_affine=True)
    return NepaForPreTraining(config).eval()


def test_maps_follow_the_definitions():
    model = make_model()
    pixels = torch.randn(1, 3, 32, 48)  # any resolution: 4 x 6 patches
    maps = compute_maps(model, pixels, query=(1, 2), layers=[1], heads=[0])
    assert maps.grid == (4, 6) and maps.attention.shape == (4, 6) and maps.pca_rgb.shape == (4, 6, 3)
    token = 1 + 1 * 6 + 2
    with torch.no_grad():
        out = model.nepa(pixels, output_attentions=True)
    expected_attention = out.attentions[1][0, 0, token, 1:].reshape(4, 6).numpy()
    np.testing.assert_allclose(maps.attention, expected_attention, atol=1e-6)
    # Causal model: the query attends to no later patch.
    assert np.all(maps.attention.reshape(-1)[token:] == 0)
    prediction = torch.nn.functional.normalize(out.last_hidden_state[0, token], dim=-1)
    targets = torch.nn.functional.normalize(out.input_embeddings[0, 1:], dim=-1)
    np.testing.assert_allclose(maps.similarity, (targets @ prediction).reshape(4, 6).numpy(), atol=1e-5)
    assert maps.similarity.min() >= -1 - 1e-6 and maps.similarity.max() <= 1 + 1e-6
    assert 0 <= maps.pca_rgb.min() and maps.pca_rgb.max() <= 1


def test_errors_and_helpers():
    model = make_model()
    with pytest.raises(ValueError, match="outside the 4x4 patch grid"):
        compute_maps(model, torch.randn(1, 3, 32, 32), query=(4, 0))
    with pytest.raises(ValueError, match="one image"):
        compute_maps(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="out of range"):
        compute_maps(model, torch.randn(1, 3, 32, 32), layers=[5])
    colours = colorize(np.array([[0.0, 1.0]]))
    assert colours.dtype == np.uint8 and tuple(colours[0, 0]) == (68, 1, 84) and tuple(colours[0, 1]) == (253, 231, 37)
    rgb = pca_to_rgb(np.random.default_rng(0).normal(size=(10, 5)))
    assert rgb.shape == (10, 3) and rgb.min() == 0 and rgb.max() == 1


def test_pngs_for_a_real_photo(tmp_path, photo_images):
    model = make_model()
    processor = NepaImageProcessorPil(size={"height": 32, "width": 32})
    paths = save_visualizations(model, processor, photo_images[0], tmp_path, query=(2, 1))
    assert set(paths) == {"attention", "similarity", "pca"}
    for path in paths.values():
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.width > 400


def test_visualize_script_on_saved_checkpoint(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "ckpt")
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "visualize.py"), "--model", str(tmp_path / "ckpt"),
         "--image", str(REPO / "data" / "photos" / "coffee.jpg"), "--output_dir", str(tmp_path / "viz"),
         "--size", "48"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == ["attention.png", "pca.png", "similarity.png"]
