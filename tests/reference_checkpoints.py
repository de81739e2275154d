"""Synthetic checkpoints in the authors' (`vit_nepa`) layout, shared by the converter and README tests."""

import json

import torch
from safetensors.torch import save_file


def reference_config(architecture="ViTNepaForPreTraining", num_labels=5, **overrides) -> dict:
    """A complete config.json as the authors' ViTNepaConfig writes it, for a tiny model."""
    config = {
        "architectures": [architecture],
        "model_type": "vit_nepa",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "use_gated_mlp": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "rope_theta": 100.0,
        "image_size": 16,
        "patch_size": 4,
        "num_channels": 3,
        "qkv_bias": True,
        "qk_norm": True,
        "qk_norm_bias": False,
        "qk_norm_affine": False,
        "layerscale_value": 1e-05,
        "drop_path_prob": 0.0,
        "add_pooling_layer": True,
        "is_causal": True,
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "pos_embed_rescale": 2.0,
        "torch_dtype": "float32",
        "transformers_version": "4.57.1",
    }
    if architecture == "ViTNepaForImageClassification":
        config["id2label"] = {str(i): f"class_{i}" for i in range(num_labels)}
        config["label2id"] = {f"class_{i}": i for i in range(num_labels)}
    config.update(overrides)
    return config


def reference_state_dict(config: dict, seed: int = 0, dtype=torch.float32, layerscale=True) -> dict:
    """Random tensors with the authors' names and shapes. Norm weights near 1 and LayerScale near 0.5, so that every
    branch visibly contributes (the released 1e-5 init would hide most mapping mistakes)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, around=0.0):
        return around + 0.2 * torch.randn(*shape, generator=generator)

    D, L, H = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    inner, patch, channels, d = config["intermediate_size"], config["patch_size"], config["num_channels"], D // H
    sd = {
        "embeddings.cls_token": rand(1, 1, D),
        "embeddings.patch_embeddings.projection.weight": rand(D, channels, patch, patch),
        "embeddings.patch_embeddings.projection.bias": rand(D),
    }
    for i in range(L):
        p = f"encoder.layer.{i}."
        for norm in ("layernorm_before", "layernorm_after"):
            sd[p + norm + ".weight"], sd[p + norm + ".bias"] = rand(D, around=1.0), rand(D)
        for proj in ("query", "key", "value"):
            sd[p + f"attention.attention.{proj}.weight"], sd[p + f"attention.attention.{proj}.bias"] = (
                rand(D, D),
                rand(D),
            )
        if config["qk_norm_affine"]:
            for norm in ("q_norm", "k_norm"):
                sd[p + f"attention.attention.{norm}.weight"] = rand(d, around=1.0)
                if config["qk_norm_bias"]:
                    sd[p + f"attention.attention.{norm}.bias"] = rand(d)
        sd[p + "attention.output.dense.weight"], sd[p + "attention.output.dense.bias"] = rand(D, D), rand(D)
        if layerscale:
            sd[p + "layer_scale.lambda1"] = rand(D, around=0.5)
            sd[p + "output.layer_scale.lambda1"] = rand(D, around=0.5)
        sd[p + "intermediate.up_proj.weight"], sd[p + "intermediate.up_proj.bias"] = rand(inner, D), rand(inner)
        if config["use_gated_mlp"]:
            sd[p + "intermediate.gate_proj.weight"], sd[p + "intermediate.gate_proj.bias"] = rand(inner, D), rand(inner)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = rand(D, inner), rand(D)
    sd["layernorm.weight"], sd["layernorm.bias"] = rand(D, around=1.0), rand(D)
    architecture = config["architectures"][0]
    if architecture != "ViTNepaModel":
        sd = {"vit_nepa." + k: v for k, v in sd.items()}
    if architecture == "ViTNepaForImageClassification":
        if config["add_pooling_layer"]:
            sd["fc_norm.weight"], sd["fc_norm.bias"] = rand(D, around=1.0), rand(D)
        num_labels = len(config["id2label"])
        sd["classifier.weight"], sd["classifier.bias"] = rand(num_labels, D), rand(num_labels)
    return {k: v.to(dtype) for k, v in sd.items()}


def write_reference_folder(folder, config, state_dict, weights="model.safetensors", preprocessor=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if weights.endswith(".safetensors"):
        save_file(state_dict, folder / weights, metadata={"format": "pt"})
    else:
        torch.save(state_dict, folder / weights)
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder
