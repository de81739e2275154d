"""A small saved NEPA classifier folder, shared by the bad-input tests."""

import torch

from nepa_hf import NepaConfig, NepaForImageClassification, NepaImageProcessorPil

LABELS = {0: "cat", 1: "coffee", 2: "rocket"}


def small_config(**overrides) -> NepaConfig:
    base = dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, patch_size=8,
        image_size=32, layerscale_value=1.0, qk_norm_affine=True, id2label=LABELS,
    )  # fmt: skip
    base.update(overrides)
    return NepaConfig(**base)


def save_folder(folder, model_class=NepaForImageClassification):
    torch.manual_seed(0)
    model = model_class(small_config()).eval()
    model.save_pretrained(folder)
    NepaImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model
