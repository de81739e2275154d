"""Attention / next-embedding similarity / PCA maps (the paper's figures) and their PNGs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nepa_hf import NepaConfig, NepaForPreTraining, NepaImageProcessorPil
from nepa_hf.evaluation.visualization import (
    FIGURE_SIZES_PX, compute_maps, pca_to_rgb, processor_view, render_attention, render_pca, render_similarity,
    save_visualizations,
)

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
    assert model.config._attn_implementation == "sdpa"  # compute_maps ran eager for the maps and restored it
    model.set_attn_implementation("eager")
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
    # What the maps were computed from travels with them, for the PNG titles.
    assert (maps.layers, maps.heads, maps.num_layers, maps.num_heads) == ((1,), (0,), 2, 2)
    assert maps.attention.sum() + maps.attention_to_cls == pytest.approx(1, abs=1e-5)  # one head: a softmax row
    assert maps.is_causal and maps.target == (1, 3) and maps.masked.sum() == 24 - 9
    assert len(maps.pca_explained_variance) == 3 and 0 < sum(maps.pca_explained_variance) <= 1 + 1e-6


def test_errors_and_helpers():
    model = make_model()
    with pytest.raises(ValueError, match="outside the 4x4 patch grid"):
        compute_maps(model, torch.randn(1, 3, 32, 32), query=(4, 0))
    with pytest.raises(ValueError, match="one image"):
        compute_maps(model, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="out of range"):
        compute_maps(model, torch.randn(1, 3, 32, 32), layers=[5])
    with pytest.raises(ValueError, match="Heads \\[2\\] out of range for a model with 2 heads"):
        compute_maps(model, torch.randn(1, 3, 32, 32), heads=[2])
    with pytest.raises(ValueError, match="No layers chosen"):
        compute_maps(model, torch.randn(1, 3, 32, 32), layers=[])
    last = compute_maps(model, torch.randn(1, 3, 32, 32), query=(3, 3), layers=[-1])
    assert last.layers == (1,) and last.target is None and not last.masked.any()
    rgb = pca_to_rgb(np.random.default_rng(0).normal(size=(10, 5)))
    assert rgb.shape == (10, 3) and rgb.min() == 0 and rgb.max() == 1


def test_pngs_for_a_real_photo(tmp_path, photo_images):
    model = make_model()
    processor = NepaImageProcessorPil(size={"height": 32, "width": 32})
    paths = save_visualizations(model, processor, photo_images[0], tmp_path, query=(2, 1))
    assert set(paths) == {"attention", "similarity", "pca"}
    for name, path in paths.items():
        with Image.open(path) as image:
            assert image.size == FIGURE_SIZES_PX[name] and image.width >= 600


def figure_texts(figure):
    texts = [figure._suptitle.get_text(), figure._supxlabel.get_text()]
    return texts + [axis.get_title() for axis in figure.axes] + [axis.get_ylabel() for axis in figure.axes]


def test_each_png_explains_itself(photo_images):
    """Title (model, image, query, aggregation), input beside the map, colourbar, causal-mask note."""
    maps = compute_maps(make_model(), torch.randn(1, 3, 32, 32), query=(2, 1), heads=[1])
    image = photo_images[0].resize((32, 32))
    attention = render_attention(maps, image, "demo/pretrained", "cat.jpg")
    title, note = attention._suptitle.get_text(), attention._supxlabel.get_text()
    for expected in ("query patch (row 2, col 1)", "demo/pretrained", "cat.jpg", "all 2 layers", "heads 1 of 2",
                     "CLS column dropped"):
        assert expected in title
    assert "Causal model" in note and "Grey cells" in note and "masked" in note
    assert len(attention.axes) == 4  # input, map, map over input, colourbar
    assert "input (the region the model sees)" in figure_texts(attention)
    assert "attention weight" in " ".join(figure_texts(attention))

    similarity = render_similarity(maps, image, "demo/pretrained", "cat.jpg")
    assert "(row 2, col 1)" in similarity._suptitle.get_text() and len(similarity.axes) == 4
    assert "(row 2, col 2), dashed box" in similarity._supxlabel.get_text()  # the patch the prediction targets
    assert "cosine similarity" in figure_texts(similarity)

    pca = render_pca(maps, image, "demo/pretrained", "cat.jpg")
    assert "principal components 1, 2, 3" in pca._suptitle.get_text() and len(pca.axes) == 2

    bidirectional = compute_maps(make_model(), torch.randn(1, 3, 32, 32), query=(2, 1))
    bidirectional.is_causal = False
    assert "Bidirectional model" in render_attention(bidirectional, image, "m", "i")._supxlabel.get_text()


def test_missing_matplotlib_is_named(tmp_path, photo_images, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    processor = NepaImageProcessorPil(size={"height": 32, "width": 32})
    with pytest.raises(ImportError, match=r"needs matplotlib, which is not installed: pip install 'nepa-hf\[viz\]'"):
        save_visualizations(make_model(), processor, photo_images[0], tmp_path)


def test_input_panel_is_the_region_the_processor_crops():
    # Reference evaluation protocol: short side to 64, centre crop 56: the model sees 56/64 of the short side.
    processor = NepaImageProcessorPil(
        size={"shortest_edge": 64}, do_center_crop=True, crop_size={"height": 56, "width": 56}
    )
    image = Image.new("RGB", (300, 200))
    assert processor(image, return_tensors="pt").pixel_values.shape[-2:] == (56, 56)
    assert processor_view(image, (56, 56), processor).size == (175, 175)
    assert processor_view(image, (56, 56), NepaImageProcessorPil()).size == (300, 200)  # no crop: all of it


@pytest.mark.slow
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
