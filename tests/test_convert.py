"""The checkpoint converter: reference (`vit_nepa`) <-> nepa-hf, numerics, round trips and errors.

Offline tests build synthetic checkpoints in the authors' layout (the authors' key names, prefixes and heads)
and check our converted model against an independent float64 forward pass computed directly from those tensors
(the authors' forward pass, RoPE, loss and heads). The network tests convert the authors' released weights and check their published values.
"""

import argparse
import json
import math
import os
import re
import socket

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

import nepa_hf  # noqa: F401  (registers model_type "nepa")
from nepa_hf import NepaConfig, NepaForPreTraining, NepaImageProcessor, NepaImageProcessorPil
from reference_checkpoints import reference_config, reference_state_dict, write_reference_folder

from nepa_hf.hub.convert import convert_with_model_card
from nepa_hf.hub.convert import main as main_with_model_card
from nepa_hf.models.nepa.convert_nepa import (
    ConversionError,
    convert_reference_checkpoint,
    convert_reference_state_dict,
    convert_to_reference,
    convert_to_reference_checkpoint,
    main,
    reference_config_from_nepa,
)

AUTO_CLASSES = {
    "ViTNepaModel": AutoModel,
    "ViTNepaForPreTraining": AutoModelForPreTraining,
    "ViTNepaForImageClassification": AutoModelForImageClassification,
}
OUR_CLASS = {
    "ViTNepaModel": "NepaModel",
    "ViTNepaForPreTraining": "NepaForPreTraining",
    "ViTNepaForImageClassification": "NepaForImageClassification",
}


# ---------------------------------------------------------------------------------------------------------------
# An independent float64 forward pass written from the reference facts, reading the authors' tensor names
# ---------------------------------------------------------------------------------------------------------------


def reference_forward(state_dict: dict, config: dict, pixel_values: torch.Tensor) -> dict:
    prefix = "vit_nepa." if any(k.startswith("vit_nepa.") for k in state_dict) else ""

    def w(name):
        return state_dict[prefix + name].double()

    def has(name):
        return prefix + name in state_dict

    eps = config["layer_norm_eps"]

    def layer_norm(t, weight=None, bias=None):
        mu = t.mean(-1, keepdim=True)
        out = (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + eps)
        out = out * weight if weight is not None else out
        return out + bias if bias is not None else out

    x = pixel_values.double()
    batch, _, height, width = x.shape
    p, D, H = config["patch_size"], config["hidden_size"], config["num_attention_heads"]
    d = D // H
    gh, gw = height // p, width // p
    patches = []
    for i in range(gh):  # Conv2d with stride = kernel is a per-patch linear map, row-major
        for j in range(gw):
            crop = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]
            patches.append(torch.einsum("bchw,dchw->bd", crop, w("embeddings.patch_embeddings.projection.weight")))
    patches = torch.stack(patches, 1) + w("embeddings.patch_embeddings.projection.bias")
    tokens = torch.cat([w("embeddings.cls_token").expand(batch, 1, D), patches], 1)
    n = tokens.shape[1]

    # 2D RoPE: inv_freq[k] = theta^(-4k/d); y angles then x angles, repeated twice; CLS is not rotated.
    inv_freq = [config["rope_theta"] ** (-4 * k / d) for k in range(d // 4)]
    cos, sin = torch.ones(n, d, dtype=torch.float64), torch.zeros(n, d, dtype=torch.float64)
    for i in range(gh):
        for j in range(gw):
            y, xc = 2 * (i + 0.5) / gh - 1, 2 * (j + 0.5) / gw - 1
            half = [2 * math.pi * y * f for f in inv_freq] + [2 * math.pi * xc * f for f in inv_freq]
            angles = torch.tensor(half + half, dtype=torch.float64)
            cos[1 + i * gw + j], sin[1 + i * gw + j] = angles.cos(), angles.sin()

    def rope(t):
        return t * cos + torch.cat([-t[..., d // 2 :], t[..., : d // 2]], -1) * sin

    act = {"gelu": F.gelu, "silu": F.silu}[config["hidden_act"]]
    h = tokens
    for layer in range(config["num_hidden_layers"]):
        pre = f"encoder.layer.{layer}."
        a = layer_norm(h, w(pre + "layernorm_before.weight"), w(pre + "layernorm_before.bias"))
        q, k, v = (
            (a @ w(pre + f"attention.attention.{name}.weight").T + w(pre + f"attention.attention.{name}.bias"))
            .view(batch, n, H, d)
            .transpose(1, 2)
            for name in ("query", "key", "value")
        )
        qk = []
        for t, norm in ((q, "q_norm"), (k, "k_norm")):  # QK-norm is always applied; affine only if saved
            name = pre + f"attention.attention.{norm}."
            weight = w(name + "weight") if has(name + "weight") else None
            bias = w(name + "bias") if has(name + "bias") else None
            qk.append(rope(layer_norm(t, weight, bias)))
        scores = qk[0] @ qk[1].transpose(-1, -2) * d**-0.5
        if config["is_causal"]:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, D)
        attn = attn @ w(pre + "attention.output.dense.weight").T + w(pre + "attention.output.dense.bias")
        h = h + (w(pre + "layer_scale.lambda1") * attn if has(pre + "layer_scale.lambda1") else attn)
        m = layer_norm(h, w(pre + "layernorm_after.weight"), w(pre + "layernorm_after.bias"))
        up = m @ w(pre + "intermediate.up_proj.weight").T + w(pre + "intermediate.up_proj.bias")
        if has(pre + "intermediate.gate_proj.weight"):
            gate = m @ w(pre + "intermediate.gate_proj.weight").T + w(pre + "intermediate.gate_proj.bias")
            inner = act(gate) * up
        else:
            inner = act(up)
        m = inner @ w(pre + "output.dense.weight").T + w(pre + "output.dense.bias")
        h = h + (w(pre + "output.layer_scale.lambda1") * m if has(pre + "output.layer_scale.lambda1") else m)
    last_hidden_state = layer_norm(h, w("layernorm.weight"), w("layernorm.bias"))
    outputs = {"last_hidden_state": last_hidden_state, "input_embeddings": tokens}

    # Pretraining loss: output t predicts input embedding t + 1, both L2-normalised.
    pred = F.normalize(last_hidden_state[:, :-1], dim=-1)
    target = F.normalize(tokens[:, 1:], dim=-1)
    outputs["loss"] = -(pred * target).sum(-1).mean()

    if "classifier.weight" in state_dict:  # heads
        if config["add_pooling_layer"]:
            pooled = last_hidden_state[:, -gh * gw :].mean(1)
            pooled = layer_norm(pooled, state_dict["fc_norm.weight"].double(), state_dict["fc_norm.bias"].double())
        else:
            pooled = last_hidden_state[:, -1]
        outputs["logits"] = pooled @ state_dict["classifier.weight"].double().T + state_dict["classifier.bias"].double()
    return outputs


VARIANTS = {
    # the base pretraining release: causal, non-affine QK-norm
    "pretrain-causal-nonaffine": dict(architecture="ViTNepaForPreTraining", qk_norm_affine=False, is_causal=True),
    # the fine-tuned releases: bidirectional, affine QK-norm, mean pooling + fc_norm
    "classifier-bidirectional-affine": dict(
        architecture="ViTNepaForImageClassification", qk_norm_affine=True, is_causal=False, drop_path_prob=0.1
    ),
    # the causal fine-tuning ablation: their classifier attends per its one `is_causal`, as ours does
    "classifier-causal-ablation": dict(
        architecture="ViTNepaForImageClassification", qk_norm_affine=True, is_causal=True, drop_path_prob=0.1
    ),
    # SwiGLU, QK-norm with bias, last-token pooling (no fc_norm)
    "classifier-gated-last-token": dict(
        architecture="ViTNepaForImageClassification", use_gated_mlp=True, hidden_act="silu", qk_norm_affine=True,
        qk_norm_bias=True, add_pooling_layer=False, is_causal=False,
    ),
    # the bare model, saved without LayerScale
    "bare-no-layerscale": dict(architecture="ViTNepaModel", qk_norm_affine=True, layerscale_value=None),
}  # fmt: skip


def make_variant(name: str, dtype=torch.float32):
    overrides = dict(VARIANTS[name])
    config = reference_config(**overrides)
    state_dict = reference_state_dict(config, dtype=dtype, layerscale=config["layerscale_value"] is not None)
    return config, state_dict


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_model_matches_reference_math(tmp_path, variant):
    config, state_dict = make_variant(variant)
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    output = convert_reference_checkpoint(source, tmp_path / "out")
    architecture = config["architectures"][0]
    model = AUTO_CLASSES[architecture].from_pretrained(output).eval()
    assert type(model).__name__ == OUR_CLASS[architecture]

    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = reference_forward(state_dict, config, pixels)
    with torch.no_grad():
        out = model(pixels)
    tolerance = dict(atol=5e-5, rtol=1e-4)
    if architecture == "ViTNepaForImageClassification":
        torch.testing.assert_close(out.logits.double(), expected["logits"], **tolerance)
        assert model.config.id2label == {i: f"class_{i}" for i in range(5)}
    else:
        torch.testing.assert_close(out.last_hidden_state.double(), expected["last_hidden_state"], **tolerance)
    if architecture == "ViTNepaForPreTraining":
        torch.testing.assert_close(out.loss.double(), expected["loss"], **tolerance)
        torch.testing.assert_close(out.input_embeddings.double(), expected["input_embeddings"], **tolerance)


def test_converted_config_mirrors_the_source():
    config, state_dict = make_variant("classifier-gated-last-token")
    ours, converted = convert_reference_state_dict(state_dict, config)
    assert ours.architectures == ["NepaForImageClassification"]
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp",
                 "hidden_act", "layer_norm_eps", "rope_theta", "image_size", "patch_size", "qkv_bias",
                 "qk_norm_affine", "qk_norm_bias", "is_causal", "pos_embed_shift", "pos_embed_jitter",
                 "pos_embed_rescale", "layerscale_value", "initializer_range"):  # fmt: skip
        assert getattr(ours, name) == config[name], name
    assert ours.drop_path_rate == config["drop_path_prob"] and ours.pooling == "last"
    assert ours.id2label == {i: f"class_{i}" for i in range(5)}
    assert ours.label2id == {f"class_{i}": i for i in range(5)}
    assert not hasattr(ours, "reference_extras")  # nothing beyond the mapped fields
    # every tensor passed through unchanged
    assert torch.equal(converted["nepa.encoder.layers.1.mlp.gate_proj.weight"],
                       state_dict["vit_nepa.encoder.layer.1.intermediate.gate_proj.weight"])  # fmt: skip
    assert torch.equal(converted["nepa.norm.bias"], state_dict["vit_nepa.layernorm.bias"])
    assert torch.equal(converted["classifier.weight"], state_dict["classifier.weight"])


def test_attention_their_pretraining_default_is_left_unset_and_every_other_value_kept(tmp_path):
    """The authors' pretraining models are causal by definition: converted, `is_causal` stays unset, so a head built
    from the folder fine-tunes bidirectionally as ours do. Other values (their classifier's, a bidirectional
    pretraining ablation) are kept; the way back writes what our models compute for an unset one."""
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    convert_reference_checkpoint(write_reference_folder(tmp_path / "src", config, state_dict), tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text()).get("is_causal") is None
    assert AutoModel.from_pretrained(tmp_path / "ours").config.resolved_is_causal is True
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "ours").config.is_causal is False
    ablation, converted = convert_reference_state_dict(state_dict, {**config, "is_causal": False})
    assert ablation.is_causal is False and convert_to_reference(converted, ablation)[0]["is_causal"] is False
    for variant, is_causal in (("classifier-bidirectional-affine", False), ("classifier-causal-ablation", True)):
        config, state_dict = make_variant(variant)
        assert convert_reference_state_dict(state_dict, config)[0].is_causal is is_causal
    sizes = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    for architecture, is_causal in (("NepaModel", True), ("NepaForPreTraining", True),
                                    ("NepaForImageClassification", False)):  # fmt: skip
        unset = NepaConfig(**sizes, architectures=[architecture])
        assert unset.is_causal is None and reference_config_from_nepa(unset)["is_causal"] is is_causal


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------


def assert_same_state_dict(actual: dict, expected: dict):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_same_config(actual: dict, expected: dict):
    # transformers_version records which transformers wrote the file; everything else must match
    strip = lambda c: {k: v for k, v in c.items() if k != "transformers_version"}  # noqa: E731
    assert strip(actual) == strip(expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_to_nepa_to_reference_is_bit_exact(tmp_path, variant):
    config, state_dict = make_variant(variant)
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    convert_reference_checkpoint(source, tmp_path / "ours")
    convert_to_reference_checkpoint(tmp_path / "ours", tmp_path / "back")
    assert_same_state_dict(load_file(tmp_path / "back" / "model.safetensors"), state_dict)
    assert_same_config(json.loads((tmp_path / "back" / "config.json").read_text()), config)
    processor = json.loads((tmp_path / "back" / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "ViTImageProcessor" and processor["size"] == {"height": 16, "width": 16}


def test_round_trip_bf16_bin_source_keeps_dtype_and_values(tmp_path):
    config, state_dict = make_variant("classifier-bidirectional-affine", dtype=torch.bfloat16)
    config["torch_dtype"] = "bfloat16"
    source = write_reference_folder(tmp_path / "src", config, state_dict, weights="pytorch_model.bin")
    convert_reference_checkpoint(source, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    convert_to_reference_checkpoint(tmp_path / "ours", tmp_path / "back")
    assert_same_state_dict(load_file(tmp_path / "back" / "model.safetensors"), state_dict)
    assert_same_config(json.loads((tmp_path / "back" / "config.json").read_text()), config)


def test_round_trip_keeps_unusual_config_entries(tmp_path, caplog):
    # A config written by a different transformers release: `dtype` spelling, square sizes as lists, ViT leftovers,
    # a field left to its default, an unknown field, and qk_norm=false (a flag the authors' code does not read).
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    config.pop("torch_dtype")
    config.pop("pos_embed_jitter")
    config.update(dtype="float32", image_size=[16, 16], encoder_stride=4, qk_norm=False, custom_note="hello")
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    with caplog.at_level("WARNING"):
        convert_reference_checkpoint(source, tmp_path / "ours")
    assert "qk_norm=false" in caplog.text and "custom_note" in caplog.text
    ours = NepaConfig.from_pretrained(tmp_path / "ours")
    assert ours.qk_norm is True and ours.image_size == 16 and ours.pos_embed_jitter is None
    convert_to_reference_checkpoint(tmp_path / "ours", tmp_path / "back")
    assert_same_config(json.loads((tmp_path / "back" / "config.json").read_text()), config)
    assert_same_state_dict(load_file(tmp_path / "back" / "model.safetensors"), state_dict)


def test_checkpoint_trained_here_goes_to_reference_layout_and_back(tmp_path):
    config = NepaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4, image_size=16,
        qk_norm_affine=True, drop_path_rate=0.05,
    )  # fmt: skip
    model = NepaForPreTraining(config)
    model.save_pretrained(tmp_path / "mine")
    convert_to_reference_checkpoint(tmp_path / "mine", tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert theirs["model_type"] == "vit_nepa" and theirs["architectures"] == ["ViTNepaForPreTraining"]
    assert theirs["drop_path_prob"] == 0.05 and theirs["add_pooling_layer"] is True and theirs["qk_norm"] is True
    assert "drop_path_rate" not in theirs and "pooling" not in theirs and "id2label" not in theirs
    keys = load_file(tmp_path / "theirs" / "model.safetensors")
    assert all(k.startswith("vit_nepa.") for k in keys)
    assert "vit_nepa.encoder.layer.1.attention.attention.query.weight" in keys
    assert "vit_nepa.encoder.layer.0.output.layer_scale.lambda1" in keys

    convert_reference_checkpoint(tmp_path / "theirs", tmp_path / "again")
    again = AutoModelForPreTraining.from_pretrained(tmp_path / "again")
    assert_same_state_dict(again.state_dict(), model.state_dict())
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval()(pixels).loss, model.eval()(pixels).loss)


def test_ema_flag_takes_the_ema_file(tmp_path):
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    ema = reference_state_dict(config, seed=7)
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    # EMA helpers often wrap the state dict and prefix "module."
    torch.save({"state_dict": {"module." + k: v for k, v in ema.items()}}, source / "pytorch_model_ema.bin")
    convert_reference_checkpoint(source, tmp_path / "plain")
    convert_with_model_card(source, tmp_path / "ema", ema=True)
    key = "nepa.embeddings.cls_token"
    assert torch.equal(
        load_file(tmp_path / "plain" / "model.safetensors")[key], state_dict["vit_nepa.embeddings.cls_token"]
    )
    assert torch.equal(load_file(tmp_path / "ema" / "model.safetensors")[key], ema["vit_nepa.embeddings.cls_token"])
    assert "EMA" in (tmp_path / "ema" / "README.md").read_text()


def test_non_affine_source_into_affine_target_starts_qk_weights_at_one(tmp_path):
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    mirrored, _ = convert_reference_state_dict(state_dict, config)
    assert mirrored.qk_norm_affine is False  # default: mirror the source
    affine, converted = convert_reference_state_dict(state_dict, config, qk_norm_affine=True)
    assert affine.qk_norm_affine is True
    for layer in range(2):
        for norm in ("q_norm", "k_norm"):
            assert torch.equal(converted[f"nepa.encoder.layers.{layer}.attention.{norm}.weight"], torch.ones(16))
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    convert_reference_checkpoint(source, tmp_path / "plain")
    convert_reference_checkpoint(source, tmp_path / "affine", qk_norm_affine=True)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = AutoModelForPreTraining.from_pretrained(tmp_path / "plain").eval()(pixels)
        with_weights = AutoModelForPreTraining.from_pretrained(tmp_path / "affine").eval()(pixels)
    torch.testing.assert_close(with_weights.last_hidden_state, plain.last_hidden_state, atol=1e-6, rtol=0)
    # Converting back keeps the (now affine) weights and says so in the config.
    back_config, back = convert_to_reference(converted, affine)
    assert back_config["qk_norm_affine"] is True
    assert torch.equal(back["vit_nepa.encoder.layer.0.attention.attention.q_norm.weight"], torch.ones(16))


def test_source_preprocessing_is_reproduced(tmp_path):
    # The authors' processor config (SixAILab/nepa-large-patch14-224, abridged): straight resize, bilinear, 0.5.
    released = {
        "crop_size": None, "do_center_crop": None, "do_convert_rgb": None, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
        "size": {"height": 16, "width": 16},
    }  # fmt: skip
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    write_reference_folder(tmp_path / "a", config, state_dict, preprocessor=released)
    write_reference_folder(tmp_path / "b", config, state_dict)
    convert_reference_checkpoint(tmp_path / "a", tmp_path / "out_a")
    convert_reference_checkpoint(tmp_path / "b", tmp_path / "out_b")
    for folder in ("out_a", "out_b"):
        processor = AutoImageProcessor.from_pretrained(tmp_path / folder)
        # AutoImageProcessor picks the torchvision backend where it is installed; the settings are the same.
        assert isinstance(processor, NepaImageProcessor or NepaImageProcessorPil)
        assert isinstance(AutoImageProcessor.from_pretrained(tmp_path / folder, backend="pil"), NepaImageProcessorPil)
        assert processor.size == {"height": 16, "width": 16} and int(processor.resample) == 2
        assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
        assert processor.do_center_crop is False
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8).numpy()
    a = AutoImageProcessor.from_pretrained(tmp_path / "out_a")(image, return_tensors="pt").pixel_values
    b = AutoImageProcessor.from_pretrained(tmp_path / "out_b")(image, return_tensors="pt").pixel_values
    assert a.shape == (1, 3, 16, 16) and torch.equal(a, b)


def test_converted_folder_has_remote_code_and_the_hub_tool_adds_the_card(tmp_path, capsys, monkeypatch):
    config, state_dict = make_variant("classifier-bidirectional-affine")
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    output = convert_reference_checkpoint(source, tmp_path / "plain")
    names = {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "modeling_nepa.py",
            "configuration_nepa.py", "image_processing_nepa.py"} <= names  # fmt: skip
    assert "README.md" not in names  # the bundle's converter imports no card template

    assert main_with_model_card(["--input", str(source), "--output", str(tmp_path / "my-nepa")]) == 0
    assert "Wrote NepaForImageClassification" in capsys.readouterr().out
    # the hub tool adds the card and every head's remote code (modeling_nepa_segmentation.py, a full auto_map)
    assert {p.name for p in (tmp_path / "my-nepa").iterdir()} == names | {"README.md", "modeling_nepa_segmentation.py"}
    assert "AutoBackbone" in json.loads((tmp_path / "my-nepa" / "config.json").read_text())["auto_map"]
    card = (tmp_path / "my-nepa" / "README.md").read_text()
    assert f"--input {source} --output my-nepa" in card and 'from_pretrained("my-nepa"' in card
    with pytest.raises(SystemExit):
        main_with_model_card(["--help"])
    assert "python -m nepa_hf.hub.convert" in capsys.readouterr().out

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelCard, "save", full_disk)  # the card is written in the same staged step as the weights
    assert main_with_model_card(["--input", str(source), "--output", str(tmp_path / "full")]) == 2
    assert "No space left on device" in capsys.readouterr().err and not (tmp_path / "full").exists()


def test_hub_ids_download_only_the_needed_files(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    config, state_dict = make_variant("pretrain-causal-nonaffine")
    hub_copy = write_reference_folder(tmp_path / "hub", config, state_dict, weights="pytorch_model.bin")
    calls = []

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, force_download=False):
        calls.append((repo_id, revision, list(allow_patterns)))
        return str(hub_copy)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    convert_with_model_card("SixAILab/nepa-base-patch14-224", tmp_path / "nepa-vit-b", revision="v1")
    # safetensors first; only when the repo has none, the .bin files (never both)
    assert [c[:2] for c in calls] == [("SixAILab/nepa-base-patch14-224", "v1")] * 2
    assert "model.safetensors" in calls[0][2] and not any(".bin" in p for p in calls[0][2])
    assert "pytorch_model.bin" in calls[1][2] and not any("safetensors" in p for p in calls[1][2])
    card = (tmp_path / "nepa-vit-b" / "README.md").read_text()
    assert "base_model: SixAILab/nepa-base-patch14-224" in card and "--revision v1" in card

    with pytest.raises(ConversionError, match="pytorch_model_ema.bin"):
        convert_reference_checkpoint("SixAILab/nepa-base-patch14-224", tmp_path / "ema2", ema=True)
    assert calls[-1][2] == ["config.json", "preprocessor_config.json", "pytorch_model_ema.bin"]

    def offline(*args, **kwargs):
        raise OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ConversionError, match="not a local folder, and the Hub could not provide it: offline"):
        convert_reference_checkpoint("SixAILab/nepa-base-patch14-224", tmp_path / "offline")


def test_sharded_safetensors_source(tmp_path):
    config, state_dict = make_variant("classifier-bidirectional-affine")
    folder = write_reference_folder(tmp_path / "src", config, {}, weights="unused.bin")
    (folder / "unused.bin").unlink()
    names = sorted(state_dict)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, keys in shards.items():
        save_file({k: state_dict[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    convert_reference_checkpoint(folder, tmp_path / "ours")
    convert_to_reference_checkpoint(tmp_path / "ours", tmp_path / "back")
    assert_same_state_dict(load_file(tmp_path / "back" / "model.safetensors"), state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_listed():
    config, state_dict = make_variant("classifier-bidirectional-affine")
    broken = dict(state_dict)
    del broken["vit_nepa.encoder.layer.1.attention.attention.key.bias"]
    broken["vit_nepa.encoder.layer.0.attention.attention.extra.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError) as error:
        convert_reference_state_dict(broken, config)
    message = str(error.value)
    assert "vit_nepa.encoder.layer.0.attention.attention.extra.weight" in message
    assert "nepa.encoder.layers.1.attention.k_proj.bias" in message


def test_shape_mismatch_is_reported():
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    state_dict["vit_nepa.layernorm.weight"] = torch.ones(33)
    with pytest.raises(
        ConversionError, match=r"vit_nepa\.layernorm\.weight \(33,\) -> nepa\.norm\.weight expects \(32,\)"
    ):
        convert_reference_state_dict(state_dict, config)


def refused(listed: str, field: str) -> str:
    """The error pattern: `listed` among the tensors, then the hint naming the config field to check."""
    return rf"(?s){listed}.*\nHint: check {re.escape(field)} in the config against the weights\.$"


def test_config_and_weights_that_disagree_get_a_hint_naming_the_field():
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    with pytest.raises(ConversionError, match=refused(r"Target tensors not filled \(4\):\n    nepa\.encoder\.layers"
                                                      r"\.0\.attention\.k_norm\.weight", "qk_norm_affine")):
        convert_reference_state_dict(state_dict, {**config, "qk_norm_affine": True})
    config, state_dict = make_variant("classifier-bidirectional-affine")
    with pytest.raises(ConversionError, match=refused(r"no place in the target \(4\)", "qk_norm_affine")):
        convert_reference_state_dict(state_dict, {**config, "qk_norm_affine": False})
    config, state_dict = make_variant("bare-no-layerscale")
    no_layer_scale = refused(r"layer_scale1\.lambda1", "layerscale_value (null: no LayerScale)")
    with pytest.raises(ConversionError, match=no_layer_scale):
        convert_reference_state_dict(state_dict, {**config, "layerscale_value": 1e-5})
    zero, _ = convert_reference_state_dict(state_dict, {**config, "layerscale_value": 0.0})
    assert zero.layerscale_value is None  # 0 without weights: no LayerScale
    config, state_dict = make_variant("classifier-gated-last-token")
    with pytest.raises(ConversionError, match=refused(r"gate_proj\.weight", "use_gated_mlp")):
        convert_reference_state_dict(state_dict, {**config, "use_gated_mlp": False})


def test_wrong_architecture_or_model_type_is_refused():
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    with pytest.raises(ConversionError, match="Unknown reference architecture"):
        convert_reference_state_dict(state_dict, {**config, "architectures": ["ViTNepaForSomething"]})
    with pytest.raises(ConversionError, match=refused(r"not filled \(4\):\n    classifier\.bias", "architectures")):
        convert_reference_state_dict(state_dict, {**config, "architectures": ["ViTNepaForImageClassification"]})
    with pytest.raises(ConversionError, match="already a nepa-hf checkpoint"):
        convert_reference_state_dict(state_dict, {**config, "model_type": "nepa"})
    with pytest.raises(ConversionError, match=r"Expected model_type 'vit_nepa', got 'vit'\.$"):
        convert_reference_state_dict(state_dict, {**config, "model_type": "vit"})
    with pytest.raises(ConversionError, match="(?s)cannot be expressed as a NepaConfig.*divisible by num_attention_heads"):
        convert_reference_state_dict(state_dict, {**config, "hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ConversionError, match="not square"):
        convert_reference_state_dict(state_dict, {**config, "image_size": [16, 32]})


def test_bin_files_are_loaded_without_unpickling_objects(tmp_path):
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    source = write_reference_folder(tmp_path / "src", config, {}, weights="model.safetensors")
    (source / "model.safetensors").unlink()
    torch.save({"state_dict": state_dict, "args": argparse.Namespace(lr=1.0)}, source / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_reference_checkpoint(source, tmp_path / "out")


def test_model_without_qk_norm_cannot_go_to_reference():
    config = NepaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        patch_size=4, image_size=16, qk_norm=False)  # fmt: skip
    model = NepaForPreTraining(config)
    with pytest.raises(ConversionError, match="always applies QK-norm"):
        convert_to_reference(model.state_dict(), model.config)


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["--input", "./no-such-folder", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no-such-folder" in err and "Traceback" not in err
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    source = write_reference_folder(tmp_path / "src", config, state_dict)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    assert main(["--input", str(source), "--output", str(tmp_path / "busy")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--input", str(source), "--output", str(tmp_path / "busy"), "--overwrite"]) == 0
    assert main(["--input", str(source), "--output", str(tmp_path / "x"), "--ema"]) == 2
    assert "pytorch_model_ema.bin" in capsys.readouterr().err
    (source / "model.safetensors").unlink()
    assert main(["--input", str(source), "--output", str(tmp_path / "y")]) == 2
    assert "No weights in" in capsys.readouterr().err


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_weights_name_the_file_and_leave_no_output(tmp_path, capsys, weights):
    """Issue 14 item 9: a cut-off weight file is one clear error naming the file and the fix, and the failed
    conversion leaves nothing at --output (a folder the user already had is kept as it was)."""
    config, state_dict = make_variant("pretrain-causal-nonaffine")
    source = write_reference_folder(tmp_path / "src", config, state_dict, weights=weights)
    path = source / weights
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted download or copy

    assert main(["--input", str(source), "--output", str(tmp_path / "new" / "nepa")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot read the weights in {path} (") and "Traceback" not in err
    assert "truncated or corrupt" in err and "Fix: copy or download it again" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output folder, parents or partial folder

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["--input", str(source), "--output", str(mine), "--overwrite"]) == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "src"]
    with pytest.raises(ConversionError, match="truncated or corrupt"):  # the Python API raises the same error
        convert_reference_checkpoint(source, tmp_path / "api")
    assert not (tmp_path / "api").exists()


def test_truncated_hub_download_suggests_force_download(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    import huggingface_hub.constants

    config, state_dict = make_variant("pretrain-causal-nonaffine")
    cache = tmp_path / "hub-cache"
    snapshot = write_reference_folder(cache / "models--SixAILab--nepa" / "snapshots" / "abc", config, state_dict)
    intact = (snapshot / "model.safetensors").read_bytes()
    (snapshot / "model.safetensors").write_bytes(intact[:1000])
    calls = []

    def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, force_download=False):
        calls.append(force_download)
        if force_download:
            (snapshot / "model.safetensors").write_bytes(intact)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert main(["--input", "SixAILab/nepa", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupt" in err and "rerun with --force-download" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["--input", "SixAILab/nepa", "--output", str(tmp_path / "out"), "--force-download"]) == 0
    assert calls == [False, True] and (tmp_path / "out" / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    import nepa_hf.models.nepa.convert_nepa as convert

    config, state_dict = make_variant("pretrain-causal-nonaffine")
    source = write_reference_folder(tmp_path / "src", config, state_dict)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert.NepaImageProcessorPil, "save_pretrained", full_disk)  # after the weights are written
    assert main(["--input", str(source), "--output", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------------------------------------------
# The authors' released weights (network; skipped when the Hub cannot be reached)
# ---------------------------------------------------------------------------------------------------------------

COCO_CATS = "http://images.cocodataset.org/val2017/000000039769.jpg"


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _online() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    return _reachable("huggingface.co") and _reachable("images.cocodataset.org", 80)


network = pytest.mark.skipif(not _online(), reason="needs the Hugging Face Hub and images.cocodataset.org")


@pytest.mark.network
@network
def test_released_sft_checkpoint_reproduces_published_logits(tmp_path):
    from transformers.image_utils import load_image

    output = convert_reference_checkpoint("SixAILab/nepa-base-patch14-224-sft", tmp_path / "nepa-vit-b-in1k")
    processor = AutoImageProcessor.from_pretrained(output)
    model = AutoModelForImageClassification.from_pretrained(output).eval()
    with torch.no_grad():
        logits = model(**processor(load_image(COCO_CATS), return_tensors="pt")).logits
    assert logits.shape == (1, 1000)
    torch.testing.assert_close(logits[0, :3], torch.tensor([-0.4296, 0.3034, -0.7744]), atol=1e-4, rtol=0)


@pytest.mark.network
@network
def test_released_pretrained_checkpoint_reproduces_published_loss(tmp_path):
    from transformers.image_utils import load_image

    output = convert_reference_checkpoint("SixAILab/nepa-base-patch14-224", tmp_path / "nepa-vit-b")
    processor = AutoImageProcessor.from_pretrained(output)
    model = AutoModelForPreTraining.from_pretrained(output).eval()
    with torch.no_grad():
        outputs = model(**processor(load_image(COCO_CATS), return_tensors="pt"))
    assert outputs.last_hidden_state.shape == (1, 257, 768)
    assert outputs.loss.item() == pytest.approx(-0.9947, abs=1e-4)
    torch.testing.assert_close(
        outputs.last_hidden_state[0, 0, :3], torch.tensor([-0.9382, -0.0110, -0.3818]), atol=1e-4, rtol=0
    )
