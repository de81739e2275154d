"""EMA (timm's ModelEmaV3 with the authors' semantics) and the dataset entry point shared by pretraining and
fine-tuning."""

import pytest
import torch
from PIL import Image

from nepa_hf import NepaConfig, NepaModel
from nepa_hf.data.images import load_image_dataset, resolve_column
from nepa_hf.training.ema import create_ema, ema_weights, load_ema, save_ema


def micro_model():
    return NepaModel(NepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, patch_size=4, image_size=8))


def test_ema_is_an_fp32_copy_updated_by_the_formula_and_round_trips(tmp_path):
    model = micro_model().to(torch.bfloat16)
    ema = create_ema(model, decay=0.9)
    assert all(t.dtype == torch.float32 for t in ema.module.state_dict().values() if t.is_floating_point())
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # the first update already averages: the EMA starts from the initial weights
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.module.state_dict()[name], 0.9 * before[name] + 0.1 * value.float())
    save_ema(ema, tmp_path / "ema.safetensors")
    other = create_ema(micro_model(), decay=0.5)
    load_ema(other, tmp_path / "ema.safetensors")
    for name, value in ema.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[name], value)
    # Swapping in and out restores the online weights exactly.
    online = {k: v.clone() for k, v in model.state_dict().items()}
    with ema_weights(ema, model):
        assert torch.equal(model.norm.weight, ema.module.norm.weight.to(torch.bfloat16))
    for name, value in model.state_dict().items():
        assert torch.equal(value, online[name])
    with pytest.raises(ValueError, match="decay"):
        create_ema(model, decay=1.5)
    (tmp_path / "partial").mkdir()
    from safetensors.torch import save_file

    save_file({"norm.weight": torch.ones(32)}, str(tmp_path / "partial" / "ema.safetensors"))
    with pytest.raises(KeyError, match="lacks EMA tensors"):
        load_ema(other, tmp_path / "partial" / "ema.safetensors")


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
