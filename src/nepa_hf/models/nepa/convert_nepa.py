# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert the authors' NEPA checkpoints (`model_type="vit_nepa"`) to nepa-hf, and back.

Command line:

    python -m nepa_hf.models.nepa.convert_nepa --input SixAILab/nepa-base-patch14-224 --output nepa-vit-b
    python -m nepa_hf.models.nepa.convert_nepa --input SixAILab/nepa-base-patch14-224 --output nepa-vit-b-ema --ema
    python -m nepa_hf.models.nepa.convert_nepa --input my-nepa --output my-nepa-vit-nepa --to-reference

`--input` is a local folder or a Hub repo id. Python API (for notebooks): `convert_reference_state_dict`,
`convert_to_reference`, `convert_reference_checkpoint`, `convert_to_reference_checkpoint`,
`load_reference_checkpoint`, `reference_config_from_nepa`.

The mapping is exact: every source tensor is consumed, every target parameter is filled, tensors keep their
values and dtype, and reference -> nepa-hf -> reference reproduces the source tensors and config fields.
"""

from __future__ import annotations

import argparse
import json
import logging as std_logging
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from .configuration_nepa import NepaConfig
from .image_processing_nepa import NepaImageProcessorPil
from .modeling_nepa import (
    NepaForImageClassification,
    NepaForPreTraining,
    NepaModel,
    NepaRopePositionEmbedding,
)

logger = logging.get_logger(__name__)

REFERENCE_MODEL_TYPE = "vit_nepa"
REFERENCE_PREFIX = "vit_nepa."
NEPA_PREFIX = "nepa."

# Defaults of the authors' `ViTNepaConfig`: what a field means when a reference config.json leaves it out.
# (Several differ from ours: patch_size 16, qk_norm False, add_pooling_layer False.)
REFERENCE_DEFAULTS: dict = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "use_gated_mlp": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "rope_theta": 100.0,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "qk_norm": False,
    "qk_norm_bias": False,
    "qk_norm_affine": False,
    "layerscale_value": 1e-5,
    "drop_path_prob": 0.0,
    "add_pooling_layer": False,
    "is_causal": True,
    "pos_embed_shift": None,
    "pos_embed_jitter": None,
    "pos_embed_rescale": 2.0,
}

# Reference fields with the same name and meaning in `NepaConfig`.
SAME_NAME_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_gated_mlp", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps", "rope_theta",
    "image_size", "patch_size", "num_channels", "qkv_bias", "qk_norm_bias", "qk_norm_affine", "is_causal",
    "pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale",
)  # fmt: skip
# Fields that change what the model computes. `qk_norm` and `layerscale_value` are not among them: the authors'
# code applies QK-norm and builds LayerScale whatever these say (layerscale_value is only an init value).
LIVE_FIELDS = frozenset(SAME_NAME_FIELDS) | {"drop_path_prob", "add_pooling_layer", "id2label", "label2id"}

REFERENCE_TO_NEPA_ARCHITECTURE = {
    "ViTNepaModel": "NepaModel",
    "ViTNepaForPreTraining": "NepaForPreTraining",
    "ViTNepaForImageClassification": "NepaForImageClassification",
}
NEPA_TO_REFERENCE_ARCHITECTURE = {ours: theirs for theirs, ours in REFERENCE_TO_NEPA_ARCHITECTURE.items()}
NEPA_CLASSES = {cls.__name__: cls for cls in (NepaModel, NepaForPreTraining, NepaForImageClassification)}

# Bare-model keys, theirs -> ours. Per-layer keys follow `encoder.layer.N.` / `encoder.layers.N.`.
TOP_LEVEL_KEYS = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.mask_token": "embeddings.mask_token",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.projection.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
LAYER_KEYS = {
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "attention.attention.query.weight": "attention.q_proj.weight",
    "attention.attention.query.bias": "attention.q_proj.bias",
    "attention.attention.key.weight": "attention.k_proj.weight",
    "attention.attention.key.bias": "attention.k_proj.bias",
    "attention.attention.value.weight": "attention.v_proj.weight",
    "attention.attention.value.bias": "attention.v_proj.bias",
    "attention.attention.q_norm.weight": "attention.q_norm.weight",
    "attention.attention.q_norm.bias": "attention.q_norm.bias",
    "attention.attention.k_norm.weight": "attention.k_norm.weight",
    "attention.attention.k_norm.bias": "attention.k_norm.bias",
    "attention.output.dense.weight": "attention.o_proj.weight",
    "attention.output.dense.bias": "attention.o_proj.bias",
    "layer_scale.lambda1": "layer_scale1.lambda1",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.up_proj.weight": "mlp.up_proj.weight",
    "intermediate.up_proj.bias": "mlp.up_proj.bias",
    "intermediate.gate_proj.weight": "mlp.gate_proj.weight",
    "intermediate.gate_proj.bias": "mlp.gate_proj.bias",
    "output.dense.weight": "mlp.down_proj.weight",
    "output.dense.bias": "mlp.down_proj.bias",
    "output.layer_scale.lambda1": "layer_scale2.lambda1",
}
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias")
_REFERENCE_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_NEPA_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_NEPA_LAYER_KEYS = {ours: theirs for theirs, ours in LAYER_KEYS.items()}
_NEPA_TOP_LEVEL_KEYS = {ours: theirs for theirs, ours in TOP_LEVEL_KEYS.items()}

# Image-processor settings shared by `ViTImageProcessor` (the authors') and `NepaImageProcessorPil`.
PROCESSOR_FIELDS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb",
)  # fmt: skip

# Files of a reference checkpoint, in order of preference.
REFERENCE_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
REFERENCE_EMA_FILE = "pytorch_model_ema.bin"

_DEFAULT_LABELS = {0: "LABEL_0", 1: "LABEL_1"}
_MAX_LISTED = 25


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------------------


def reference_key_to_nepa(key: str) -> str | None:
    """Map one bare-model reference key (no `vit_nepa.` prefix) to ours; `None` if it has no counterpart."""
    if key in TOP_LEVEL_KEYS:
        return TOP_LEVEL_KEYS[key]
    match = _REFERENCE_LAYER.match(key)
    if match and match.group(2) in LAYER_KEYS:
        return f"encoder.layers.{match.group(1)}.{LAYER_KEYS[match.group(2)]}"
    return None


def nepa_key_to_reference(key: str) -> str | None:
    """Map one bare-model key of ours (no `nepa.` prefix) to the reference name; `None` if it has none."""
    if key in _NEPA_TOP_LEVEL_KEYS:
        return _NEPA_TOP_LEVEL_KEYS[key]
    match = _NEPA_LAYER.match(key)
    if match and match.group(2) in _NEPA_LAYER_KEYS:
        return f"encoder.layer.{match.group(1)}.{_NEPA_LAYER_KEYS[match.group(2)]}"
    return None


def _listing(title: str, items: list[str]) -> str:
    shown = sorted(items)[:_MAX_LISTED]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"{title} ({len(items)}):\n" + "\n".join(f"    {item}" for item in shown) + more


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def _as_dict(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise TypeError(f"Expected a config dict or a transformers config, got {type(config).__name__}.")


def _square_size(name: str, value):
    """The reference allows `image_size`/`patch_size` as [h, w]; NepaConfig takes one int."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(
                f"Reference {name}={list(value)} is not square; NepaConfig needs a single int. (Inputs of any size "
                "divisible by the patch size still work at run time; only the nominal size is stored.)"
            )
        return value[0]
    return value


def _same_meaning(name: str, reference_value, canonical_value) -> bool:
    if name in ("image_size", "patch_size"):
        try:
            return _square_size(name, reference_value) == canonical_value
        except ConversionError:
            return False
    return reference_value == canonical_value


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _architecture_of(config: NepaConfig) -> str:
    for name in config.architectures or []:
        if name in NEPA_TO_REFERENCE_ARCHITECTURE:
            return name
    if config.architectures:
        raise ConversionError(
            f"Architecture {config.architectures} has no counterpart in the authors' code, which provides "
            f"{sorted(NEPA_TO_REFERENCE_ARCHITECTURE)} only."
        )
    return "NepaModel"


def reference_config_from_nepa(config: NepaConfig, architecture: str | None = None, apply_extras: bool = True) -> dict:
    """Our config -> the authors' `vit_nepa` config dict (their field names and defaults).

    `config.reference_extras` (written by the forward conversion) restores what a source config held beyond the
    mapped fields, so a converted checkpoint goes back to exactly its original config.json.
    """
    if not config.qk_norm:
        raise ConversionError(
            "This model has qk_norm=False, but the authors' implementation always applies QK-norm (their "
            "`qk_norm` flag is not read by their code), so it cannot be expressed in their layout."
        )
    architecture = architecture or _architecture_of(config)
    reference = {"architectures": [NEPA_TO_REFERENCE_ARCHITECTURE[architecture]], "model_type": REFERENCE_MODEL_TYPE}
    for name in SAME_NAME_FIELDS:
        reference[name] = getattr(config, name)
    if architecture == "NepaForImageClassification":
        # The authors' classifier attends per its one `is_causal`; ours per `finetuning_is_causal` (is_causal is the
        # attention of NepaModel/NepaForPreTraining). Write the attention the classifier computes.
        reference["is_causal"] = config.finetuning_is_causal
    reference["qk_norm"] = True
    reference["layerscale_value"] = config.layerscale_value
    reference["drop_path_prob"] = config.drop_path_rate
    reference["add_pooling_layer"] = config.pooling == "mean"
    if architecture == "NepaForImageClassification" or config.id2label != _DEFAULT_LABELS:
        reference["id2label"] = {str(index): label for index, label in config.id2label.items()}
        reference["label2id"] = dict(config.label2id)
    if config.problem_type is not None:
        reference["problem_type"] = config.problem_type
    if _dtype_name(getattr(config, "dtype", None)) is not None:
        reference["torch_dtype"] = _dtype_name(config.dtype)
    reference["transformers_version"] = transformers.__version__

    extras = (getattr(config, "reference_extras", None) or {}) if apply_extras else {}
    for name, value in (extras.get("fields") or {}).items():
        if name in LIVE_FIELDS and not _same_meaning(name, value, reference.get(name)):
            # The model was changed after conversion (e.g. a new image size): the current value wins.
            logger.warning(
                f"Ignoring the stored reference value {name}={value!r}: the model now has {reference.get(name)!r}."
            )
            continue
        reference[name] = value
    for name in extras.get("absent") or []:
        if name in LIVE_FIELDS and reference.get(name) != REFERENCE_DEFAULTS.get(name):
            continue  # leaving it out would change its meaning (their default differs)
        reference.pop(name, None)
    return dict(sorted(reference.items()))


@dataclass
class _ReferenceLayout:
    """What the weights say about the architecture (the config alone is not trusted for these)."""

    has_layerscale: bool
    has_qk_norm_weight: bool
    has_qk_norm_bias: bool
    has_gate_proj: bool
    has_mask_token: bool
    has_fc_norm: bool
    num_labels: int | None
    prefixed: bool


def _inspect_reference_layout(state_dict: dict) -> _ReferenceLayout:
    keys = list(state_dict)
    classifier = state_dict.get("classifier.weight")
    return _ReferenceLayout(
        has_layerscale=any(k.endswith("layer_scale.lambda1") for k in keys),
        has_qk_norm_weight=any(re.search(r"\.[qk]_norm\.weight$", k) for k in keys),
        has_qk_norm_bias=any(re.search(r"\.[qk]_norm\.bias$", k) for k in keys),
        has_gate_proj=any(".intermediate.gate_proj." in k for k in keys),
        has_mask_token=any(k.endswith("embeddings.mask_token") for k in keys),
        has_fc_norm="fc_norm.weight" in state_dict,
        num_labels=int(classifier.shape[0]) if classifier is not None else None,
        prefixed=any(k.startswith(REFERENCE_PREFIX) for k in keys),
    )


def _reference_architecture(reference_config: dict, layout: _ReferenceLayout) -> str:
    architectures = reference_config.get("architectures") or []
    known = [name for name in architectures if name in REFERENCE_TO_NEPA_ARCHITECTURE]
    if architectures and not known:
        raise ConversionError(
            f"Unknown reference architecture {architectures}; expected one of {sorted(REFERENCE_TO_NEPA_ARCHITECTURE)}."
        )
    if known:
        architecture = known[0]
    elif layout.num_labels is not None:
        architecture = "ViTNepaForImageClassification"
    elif layout.prefixed:
        architecture = "ViTNepaForPreTraining"
    else:
        architecture = "ViTNepaModel"
    if architecture == "ViTNepaForImageClassification" and layout.num_labels is None:
        raise ConversionError(
            "The config says ViTNepaForImageClassification but the checkpoint has no `classifier.weight`. "
            "Fix `architectures` in config.json (ViTNepaForPreTraining for a pretrained backbone)."
        )
    return architecture


def _check_model_type(reference_config: dict) -> None:
    model_type = reference_config.get("model_type", REFERENCE_MODEL_TYPE)
    if model_type == NepaConfig.model_type:
        raise ConversionError(
            "This checkpoint is already in nepa-hf format (model_type 'nepa'). Load it with AutoModel directly, or "
            "pass --to-reference to convert it to the authors' layout."
        )
    if model_type != REFERENCE_MODEL_TYPE:
        raise ConversionError(
            f"Expected a reference NEPA checkpoint (model_type '{REFERENCE_MODEL_TYPE}'), "
            f"got model_type {model_type!r}."
        )


def _reference_value(reference_config: dict, name: str):
    return reference_config.get(name, REFERENCE_DEFAULTS[name])


def nepa_config_from_reference(
    reference_config: dict, layout: _ReferenceLayout, architecture: str, qk_norm_affine: bool | None = None
) -> NepaConfig:
    """Reference config dict (+ what the weights show) -> `NepaConfig`, mirroring the source exactly."""
    kwargs = {name: _reference_value(reference_config, name) for name in SAME_NAME_FIELDS}
    kwargs["image_size"] = _square_size("image_size", kwargs["image_size"])
    kwargs["patch_size"] = _square_size("patch_size", kwargs["patch_size"])
    kwargs["drop_path_rate"] = _reference_value(reference_config, "drop_path_prob")
    kwargs["pooling"] = "mean" if _reference_value(reference_config, "add_pooling_layer") else "last"
    # The authors' attention builds q_norm/k_norm unconditionally, so QK-norm is always on.
    kwargs["qk_norm"] = True
    if not _reference_value(reference_config, "qk_norm"):
        logger.warning(
            "The source config says qk_norm=false, but the authors' code applies QK-norm regardless of that flag: "
            "converting with qk_norm=True (what their model computes). --to-reference restores the flag."
        )
    if qk_norm_affine is not None:
        kwargs["qk_norm_affine"] = qk_norm_affine
    if kwargs["use_gated_mlp"] != layout.has_gate_proj:
        raise ConversionError(
            f"The config says use_gated_mlp={kwargs['use_gated_mlp']} but the checkpoint "
            f"{'has' if layout.has_gate_proj else 'has no'} `intermediate.gate_proj` weights. Fix config.json."
        )

    layerscale_value = _reference_value(reference_config, "layerscale_value")
    if layout.has_layerscale:
        kwargs["layerscale_value"] = (
            layerscale_value if layerscale_value is not None else REFERENCE_DEFAULTS["layerscale_value"]
        )
    elif layerscale_value is None or layerscale_value <= 0:
        kwargs["layerscale_value"] = None  # no LayerScale: blocks without the per-channel scale
    else:
        raise ConversionError(
            f"The config has layerscale_value={layerscale_value} but the checkpoint has no `layer_scale.lambda1` "
            "weights. Set layerscale_value to null in config.json if the model was trained without LayerScale."
        )
    kwargs["use_mask_token"] = layout.has_mask_token

    if "id2label" in reference_config:
        kwargs["id2label"] = {int(index): label for index, label in reference_config["id2label"].items()}
        if "label2id" in reference_config:
            kwargs["label2id"] = {label: int(index) for label, index in reference_config["label2id"].items()}
    if layout.num_labels is not None:
        if "id2label" in kwargs and len(kwargs["id2label"]) != layout.num_labels:
            raise ConversionError(
                f"config.json lists {len(kwargs['id2label'])} labels but the classifier has {layout.num_labels} "
                "outputs. Fix id2label/label2id in config.json."
            )
        if "id2label" not in kwargs:
            kwargs["num_labels"] = layout.num_labels
    if reference_config.get("problem_type") is not None:
        kwargs["problem_type"] = reference_config["problem_type"]
    dtype = reference_config.get("torch_dtype", reference_config.get("dtype"))
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs["architectures"] = [REFERENCE_TO_NEPA_ARCHITECTURE[architecture]]
    if architecture == "ViTNepaForImageClassification":
        # Their classifier attends per `is_causal` (False for their fine-tuned releases, True for the causal
        # fine-tuning ablation); ours reads `finetuning_is_causal`. `is_causal` keeps the source value for NepaModel.
        kwargs["finetuning_is_causal"] = kwargs["is_causal"]
    try:
        return NepaConfig(**kwargs)
    except (ValueError, TypeError) as error:
        raise ConversionError(f"The reference config cannot be expressed as a NepaConfig: {error}") from error


def _reference_extras(reference_config: dict, config: NepaConfig, overridden: set[str]) -> dict:
    """What the source config.json holds beyond what our config maps back to (kept for an exact round trip)."""
    canonical = reference_config_from_nepa(config, apply_extras=False)
    fields = {}
    for name, value in reference_config.items():
        if name == "transformers_version" or (name in canonical and canonical[name] == value):
            continue  # the version is metadata: the writer records its own
        if name in overridden:
            continue  # the user asked for a different value: it must not come back
        if name in LIVE_FIELDS and name in canonical and not _same_meaning(name, value, canonical[name]):
            raise ConversionError(f"Internal mapping error: reference {name}={value!r} became {canonical[name]!r}.")
        fields[name] = value
    absent = sorted(name for name in canonical if name not in reference_config and name != "transformers_version")
    known = set(REFERENCE_DEFAULTS) | {"architectures", "model_type", "id2label", "label2id", "problem_type"}
    unknown = sorted(name for name in fields if name not in known and name not in _BASE_CONFIG_FIELDS)
    if unknown:
        logger.warning(
            f"The source config has fields the authors' ViTNepaConfig does not define: {unknown}. They do not "
            "affect the converted model and are kept only to write them back with --to-reference."
        )
    extras = {}
    if fields:
        extras["fields"] = fields
    if absent:
        extras["absent"] = absent
    return extras


# Fields every transformers config carries (current and older releases); not worth a warning when present.
_BASE_CONFIG_FIELDS = frozenset(transformers.PreTrainedConfig().to_dict()) | {
    "torch_dtype", "dtype", "transformers_version", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "finetuning_task", "tokenizer_class", "prefix", "task_specific_params", "encoder_stride", "pooler_act",
    "pooler_output_size", "_attn_implementation_autoset",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------------------


def _expected_state_dict(config: NepaConfig, architecture: str) -> dict[str, torch.Size]:
    """Names and shapes of every persistent tensor of our model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = NEPA_CLASSES[architecture](config)
    return {name: tensor.shape for name, tensor in model.state_dict().items()}


def convert_reference_state_dict(
    state_dict: dict[str, torch.Tensor], reference_config, *, qk_norm_affine: bool | None = None
) -> tuple[NepaConfig, dict[str, torch.Tensor]]:
    """The authors' state dict and config (dict or config object) -> (`NepaConfig`, our state dict).

    The target class follows the source `architectures` (ViTNepaModel -> NepaModel, ViTNepaForPreTraining ->
    NepaForPreTraining, ViTNepaForImageClassification -> NepaForImageClassification) and is recorded in
    `config.architectures`. Tensors are passed through unchanged (same values, same dtype).

    `qk_norm_affine=True` converts a non-affine QK-norm source to an affine target with weights 1.0 (the same
    function); by default the converted config mirrors the source.

    Raises `ConversionError` listing every unused source key, every unfilled target parameter and every shape
    mismatch.
    """
    reference_config = _as_dict(reference_config)
    _check_model_type(reference_config)
    state_dict = dict(state_dict)
    # A persistent RoPE buffer in some exports: consumed if it holds the frequencies we compute ourselves.
    rope_keys = [k for k in state_dict if k.endswith("rope_embeddings.inv_freq")]
    layout = _inspect_reference_layout(state_dict)
    architecture = _reference_architecture(reference_config, layout)
    config = nepa_config_from_reference(reference_config, layout, architecture, qk_norm_affine=qk_norm_affine)
    for key in rope_keys:
        expected = NepaRopePositionEmbedding.compute_inv_freq(config)
        if not torch.allclose(state_dict[key].float(), expected, rtol=1e-5, atol=1e-7):
            raise ConversionError(f"{key} does not hold the RoPE frequencies of this config (rope_theta, head dim).")
        del state_dict[key]

    ours = REFERENCE_TO_NEPA_ARCHITECTURE[architecture]
    expected = _expected_state_dict(config, ours)
    head_prefix = "" if ours == "NepaModel" else NEPA_PREFIX
    converted: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unexpected, duplicates = [], []
    for key, tensor in state_dict.items():
        if key in HEAD_KEYS:
            target = key
        else:
            bare = key[len(REFERENCE_PREFIX) :] if key.startswith(REFERENCE_PREFIX) else key
            mapped = reference_key_to_nepa(bare)
            target = head_prefix + mapped if mapped is not None else None
        if target is None or target not in expected:
            unexpected.append(key)
        elif target in converted:
            duplicates.append(f"{source_of[target]} and {key} -> {target}")
        else:
            converted[target] = tensor
            source_of[target] = key

    missing = [name for name in expected if name not in converted]
    if qk_norm_affine and not layout.has_qk_norm_weight:
        # Non-affine source, affine target asked for: weight 1 (and bias 0) is exactly the non-affine normalisation.
        reference_dtype = next(iter(state_dict.values())).dtype if state_dict else torch.float32
        for name in list(missing):
            if re.search(r"\.[qk]_norm\.(weight|bias)$", name):
                fill = torch.ones if name.endswith("weight") else torch.zeros
                converted[name] = fill(expected[name], dtype=reference_dtype)
                missing.remove(name)

    mismatched = [
        f"{source_of[name]} {tuple(converted[name].shape)} -> {name} expects {tuple(expected[name])}"
        for name in converted
        if name in source_of and converted[name].shape != expected[name]
    ]
    if unexpected or missing or mismatched or duplicates:
        problems = []
        if unexpected:
            problems.append(_listing("Source tensors with no place in the target model", unexpected))
        if missing:
            problems.append(_listing("Target parameters not filled by the checkpoint", missing))
        if mismatched:
            problems.append(_listing("Shape mismatches", mismatched))
        if duplicates:
            problems.append(_listing("Source tensors mapping to the same target", duplicates))
        hints = _layout_hints(reference_config, layout, unexpected, missing)
        raise ConversionError(
            f"Cannot convert this {architecture} checkpoint to {ours}:\n" + "\n".join(problems) + hints
        )

    if getattr(config, "dtype", None) is None and converted:
        # The written weights carry a dtype whatever the source config said: record it (and the extras below
        # remember that the source config did not name it).
        config.dtype = next(iter(converted.values())).dtype
    overridden = {"qk_norm_affine"} if qk_norm_affine is not None else set()
    extras = _reference_extras(reference_config, config, overridden)
    if extras:
        config.reference_extras = extras
    ordered = {name: converted[name] for name in expected}
    return config, ordered


def _layout_hints(reference_config: dict, layout: _ReferenceLayout, unexpected: list[str], missing: list[str]) -> str:
    hints = []
    if any(re.search(r"[qk]_norm\.weight$", k) for k in unexpected):
        hints.append("the checkpoint has QK-norm weights but config.json says qk_norm_affine=false")
    if any(re.search(r"[qk]_norm\.weight$", k) for k in missing):
        hints.append(
            "config.json says qk_norm_affine=true but the checkpoint has no QK-norm weights (pass "
            "qk_norm_affine=False, or --qk-norm-affine to start them at 1.0 only when the source is non-affine)"
        )
    if any(k.endswith(("classifier.weight", "fc_norm.weight")) for k in missing):
        hints.append("check `architectures` and add_pooling_layer in config.json")
    if any(re.search(r"encoder\.layers\.(\d+)\.", k) for k in missing) and not any(
        re.search(r"encoder\.layer\.\d+\.", k) for k in unexpected
    ):
        hints.append(
            f"num_hidden_layers={_reference_value(reference_config, 'num_hidden_layers')} may not match the checkpoint"
        )
    return "".join(f"\nHint: {hint}." for hint in hints)


def convert_to_reference(
    state_dict: dict[str, torch.Tensor], config: NepaConfig
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our state dict and `NepaConfig` -> (the authors' config dict, their state dict), tensors unchanged."""
    architecture = _architecture_of(config)
    reference_config = reference_config_from_nepa(config, architecture)
    if not config.pretraining_shift or not config.pretraining_stop_gradient:
        logger.warning(
            "pretraining_shift/pretraining_stop_gradient are ablation settings the authors' config cannot express; "
            "their pretraining code always shifts and stops the gradient."
        )
    if config.layerscale_value is None:
        logger.warning(
            "This model has no LayerScale. The authors' current code builds LayerScale unconditionally, so it "
            "will not load these weights as they are."
        )
    expected = _expected_state_dict(config, architecture)
    prefix = "" if architecture == "NepaModel" else REFERENCE_PREFIX
    converted: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        if key not in expected:
            unexpected.append(key)
            continue
        if key in HEAD_KEYS:
            converted[key] = tensor
            continue
        bare = key[len(NEPA_PREFIX) :] if key.startswith(NEPA_PREFIX) and architecture != "NepaModel" else key
        mapped = nepa_key_to_reference(bare)
        if mapped is None:
            unexpected.append(key)
        else:
            converted[prefix + mapped] = tensor
    missing = [name for name in expected if name not in state_dict]
    mismatched = [
        f"{name} {tuple(state_dict[name].shape)}, expected {tuple(expected[name])}"
        for name in expected
        if name in state_dict and state_dict[name].shape != expected[name]
    ]
    if unexpected or missing or mismatched:
        problems = []
        if unexpected:
            problems.append(_listing("Tensors with no counterpart in the authors' layout", unexpected))
        if missing:
            problems.append(_listing(f"Parameters of {architecture} missing from the state dict", missing))
        if mismatched:
            problems.append(_listing("Shape mismatches", mismatched))
        raise ConversionError(
            f"Cannot convert this {architecture} state dict to the authors' layout:\n" + "\n".join(problems)
        )
    return reference_config, converted


# --------------------------------------------------------------------------------------------------------------
# Files: loading, resolving Hub ids, writing
# --------------------------------------------------------------------------------------------------------------


def _resolve_folder(
    source: str | Path,
    allow_patterns: list[str],
    revision: str | None,
    token: str | bool | None,
    force_download: bool = False,
) -> Path:
    """A local folder as is, otherwise a Hub repo id downloaded (only `allow_patterns`) into the HF cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{source} is a file; pass the checkpoint folder (with config.json) instead.")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    extra = {"force_download": True} if force_download else {}
    try:
        return Path(
            snapshot_download(str(source), revision=revision, token=token, allow_patterns=allow_patterns, **extra)
        )
    except HFValidationError:
        raise ConversionError(f"{source} is neither an existing local folder nor a valid Hub repo id.") from None
    except GatedRepoError:
        raise ConversionError(f"{source} is gated: accept its terms on the Hub and log in (`hf auth login`).") from None
    except RepositoryNotFoundError:
        raise ConversionError(
            f"No local folder {source} and no Hub repo {source} (or it is private: log in with `hf auth login`)."
        ) from None
    except RevisionNotFoundError:
        raise ConversionError(f"Revision {revision!r} does not exist in {source}.") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise ConversionError(
            f"Cannot reach the Hugging Face Hub (offline or HF_HUB_OFFLINE=1) and {source} is not in the local "
            "cache. Connect, or download the folder elsewhere and pass its local path."
        ) from None
    except OSError as error:  # connection errors (httpx/requests subclass OSError) and HTTP errors
        raise ConversionError(f"Could not download {source} from the Hub: {error}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None


def _unwrap_bin(obj, path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` may hold the state dict itself or wrap it (training checkpoints, EMA helpers)."""
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        wrapped = [
            obj[key]
            for key in ("state_dict", "model", "module", "ema", "model_ema", "state_dict_ema")
            if isinstance(obj, dict) and isinstance(obj.get(key), dict)
        ]
        if not wrapped or not all(isinstance(v, torch.Tensor) for v in wrapped[0].values()):
            raise ConversionError(f"{path} does not contain a state dict (a mapping of names to tensors).")
        state_dict = wrapped[0]
    if state_dict and all(k.startswith("module.") for k in state_dict):  # saved from a DDP/EMA wrapper
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def _in_hub_cache(path: Path) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return path.absolute().is_relative_to(Path(HF_HUB_CACHE).absolute())
    except (OSError, ValueError):
        return False


def _unreadable_weights(path: Path, error: Exception) -> ConversionError:
    """The error for a weight file that exists but cannot be parsed: usually an interrupted download or copy."""
    size = path.stat().st_size if path.exists() else 0
    if _in_hub_cache(path):
        fix = "rerun with --force-download to download it again (force_download=True in Python)"
    else:
        fix = "copy or download it again, or convert another checkpoint"
    return ConversionError(
        f"Cannot read the weights in {path} ({size:,} bytes): the file is truncated or corrupt ({error}). "
        f"Fix: {fix}."
    )


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:  # header/length checks fail on truncated or corrupt files
            raise _unreadable_weights(path, error) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except pickle.UnpicklingError as error:  # weights_only refused an object (or a damaged legacy pickle)
        raise ConversionError(
            f"Could not read {path} safely with torch.load(weights_only=True): it holds objects other than tensors, "
            f"or is damaged. {error}"
        ) from None
    except (RuntimeError, EOFError, OSError, struct.error) as error:  # zip or pickle stream cut short or damaged
        raise _unreadable_weights(path, error) from None
    return _unwrap_bin(obj, path)


def _load_weights(folder: Path, filename: str) -> dict[str, torch.Tensor]:
    path = folder / filename
    if not filename.endswith(".index.json"):
        return _load_weight_file(path)
    shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
    state_dict: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not (folder / shard).exists():
            raise ConversionError(f"Shard {shard} listed in {filename} is missing from {folder}.")
        state_dict.update(_load_weight_file(folder / shard))
    return state_dict


def _weight_file_in(folder: Path, ema: bool) -> str:
    if ema:
        if not (folder / REFERENCE_EMA_FILE).exists():
            raise ConversionError(f"--ema: {folder} has no {REFERENCE_EMA_FILE}. Files there: {_files_in(folder)}.")
        return REFERENCE_EMA_FILE
    for filename in REFERENCE_WEIGHT_FILES:
        if (folder / filename).exists():
            return filename
    raise ConversionError(
        f"No weights in {folder} (looked for {', '.join(REFERENCE_WEIGHT_FILES)}). Files there: {_files_in(folder)}."
    )


def _files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _download_reference(source, ema: bool, revision, token, force_download: bool = False) -> Path:
    base = ["config.json", "preprocessor_config.json"]
    hub = dict(revision=revision, token=token, force_download=force_download)
    if ema:
        return _resolve_folder(source, base + [REFERENCE_EMA_FILE], **hub)
    folder = _resolve_folder(
        source, base + ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"], **hub
    )
    if not any((folder / name).exists() for name in REFERENCE_WEIGHT_FILES[:2]) and not Path(source).exists():
        folder = _resolve_folder(
            source, base + ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"], **hub
        )
    return folder


@dataclass
class ReferenceCheckpoint:
    config: dict
    state_dict: dict[str, torch.Tensor]
    preprocessor_config: dict | None
    folder: Path
    weights_file: str


def load_reference_checkpoint(
    source: str | Path,
    *,
    ema: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
) -> ReferenceCheckpoint:
    """Read a reference checkpoint (local folder or Hub id): config.json, weights, preprocessor_config.json.

    `force_download=True` downloads a Hub id's files again even if they are cached (e.g. a truncated download)."""
    folder = _download_reference(source, ema, revision, token, force_download)
    if not (folder / "config.json").exists():
        raise ConversionError(f"{folder} has no config.json. Files there: {_files_in(folder)}.")
    config = _read_json(folder / "config.json")
    _check_model_type(config)
    weights_file = _weight_file_in(folder, ema)
    state_dict = _load_weights(folder, weights_file)
    preprocessor = folder / "preprocessor_config.json"
    return ReferenceCheckpoint(
        config=config,
        state_dict=state_dict,
        preprocessor_config=_read_json(preprocessor) if preprocessor.exists() else None,
        folder=folder,
        weights_file=weights_file,
    )


def image_processor_from_reference(preprocessor_config: dict | None, config: NepaConfig) -> NepaImageProcessorPil:
    """The source's preprocessing as a `NepaImageProcessorPil`.

    Without a source preprocessor config: the released checkpoints' preprocessing (resize straight to the model's
    image size, bilinear, rescale 1/255, mean = std = 0.5), which are `NepaImageProcessorPil`'s defaults.
    """
    kwargs = {"size": {"height": config.image_size, "width": config.image_size}}
    for name in PROCESSOR_FIELDS + ("do_center_crop", "crop_size"):
        value = (preprocessor_config or {}).get(name)
        if value is not None:
            kwargs[name] = value
    if isinstance(kwargs["size"], int):  # old ViT processors stored a bare int for a square resize
        kwargs["size"] = {"height": kwargs["size"], "width": kwargs["size"]}
    return NepaImageProcessorPil(**kwargs)


def reference_preprocessor_config(processor: NepaImageProcessorPil | None, config: NepaConfig) -> dict:
    """A `ViTImageProcessor` config (the authors' processor class) with the same preprocessing."""
    processor = processor or NepaImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
    settings = processor.to_dict()
    if settings.get("do_center_crop"):
        logger.warning("ViTImageProcessor has no centre crop: the authors' processor config will resize only.")
    result = {name: settings.get(name) for name in PROCESSOR_FIELDS}
    result["resample"] = int(result["resample"]) if result["resample"] is not None else None
    result["image_processor_type"] = "ViTImageProcessor"
    return dict(sorted(result.items()))


@contextmanager
def _staged_output(output_dir: str | Path, overwrite: bool):
    """Yield a temporary folder beside `output_dir` to write the conversion into.

    On success its files move into `output_dir` (renamed into place when the folder is new; a folder the user
    already had is kept, with our files replacing theirs of the same name). On any failure the temporary folder is
    removed, so a failed conversion leaves neither an empty nor a half-written output folder.
    """
    output = Path(output_dir).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConversionError(f"Output {output} exists and is not empty; choose another folder or pass --overwrite.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"Output {output} is a file; pass a folder path for --output.")
    anchor = output.parent  # missing parents are created only once the conversion has succeeded
    while not anchor.exists():
        anchor = anchor.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=anchor))
    try:
        yield staging
        if output.is_dir():
            for item in staging.iterdir():
                target = output / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging, output)  # a rename on the same file system
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _independent(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses views into a shared buffer (possible in .bin files): give those their own storage."""
    result = {}
    for name, tensor in state_dict.items():
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        result[name] = tensor.contiguous() if whole else tensor.clone(memory_format=torch.contiguous_format)
    return result


def save_nepa_checkpoint(
    config: NepaConfig,
    state_dict: dict[str, torch.Tensor],
    output_dir: str | Path,
    image_processor: NepaImageProcessorPil | None = None,
    model_card=None,
) -> Path:
    """Write a nepa-hf folder: weights (safetensors, dtype kept), config, processor config, code files, card."""
    output = Path(output_dir)
    architecture = _architecture_of(config)
    with torch.device("meta"):
        model = NEPA_CLASSES[architecture](config)
    model.load_state_dict(_independent(state_dict), strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers are not in the state dict: rebuild them
        if isinstance(module, NepaRopePositionEmbedding):
            module.inv_freq = NepaRopePositionEmbedding.compute_inv_freq(config)
    model.save_pretrained(output)
    (image_processor or image_processor_from_reference(None, config)).save_pretrained(output)
    if model_card is not None:
        model_card.save(output / "README.md")
    return output


def convert_reference_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    *,
    ema: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    qk_norm_affine: bool | None = None,
    overwrite: bool = False,
    model_card: bool = True,
    force_download: bool = False,
) -> Path:
    """Convert a reference checkpoint (local folder or Hub id) into a nepa-hf folder that the Auto classes load.

    Returns the output folder. See `convert_reference_state_dict` for the mapping and its checks. Nothing is left at
    `output_dir` when the conversion fails (see `_staged_output`).
    """
    output = Path(output_dir).expanduser()
    with _staged_output(output, overwrite) as staging:
        checkpoint = load_reference_checkpoint(
            source, ema=ema, revision=revision, token=token, force_download=force_download
        )
        config, state_dict = convert_reference_state_dict(
            checkpoint.state_dict, checkpoint.config, qk_norm_affine=qk_norm_affine
        )
        processor = image_processor_from_reference(checkpoint.preprocessor_config, config)
        card = None
        if model_card:
            from ...hub.model_card import card_for_conversion

            card = card_for_conversion(str(source), config, repo_id=output.name, ema=ema, revision=revision)
        save_nepa_checkpoint(config, state_dict, staging, processor, card)
    return output


def load_nepa_checkpoint(
    source: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
) -> tuple[NepaConfig, dict[str, torch.Tensor], NepaImageProcessorPil | None]:
    """Read a nepa-hf folder (local or Hub id) without building the model: config, state dict, processor."""
    folder = _resolve_folder(
        source,
        [
            "config.json",
            "preprocessor_config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "model-*.safetensors",
        ],
        revision,
        token,
        force_download,
    )
    if not (folder / "config.json").exists():
        raise ConversionError(f"{folder} has no config.json. Files there: {_files_in(folder)}.")
    raw = _read_json(folder / "config.json")
    if raw.get("model_type") != NepaConfig.model_type:
        raise ConversionError(
            f"--to-reference expects a nepa-hf checkpoint (model_type 'nepa'), got {raw.get('model_type')!r}."
        )
    config = NepaConfig.from_pretrained(folder)
    for filename in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / filename).exists():
            state_dict = _load_weights(folder, filename)
            break
    else:
        raise ConversionError(f"No model.safetensors in {folder}. Files there: {_files_in(folder)}.")
    processor = None
    if (folder / "preprocessor_config.json").exists():
        processor = NepaImageProcessorPil.from_pretrained(folder)
    return config, state_dict, processor


def save_reference_checkpoint(
    reference_config: dict,
    state_dict: dict[str, torch.Tensor],
    output_dir: str | Path,
    preprocessor_config: dict | None = None,
) -> Path:
    """Write the authors' layout: config.json (their fields), model.safetensors (their keys), processor config."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(reference_config, indent=2, sort_keys=True) + "\n")
    save_file(_independent(state_dict), output / "model.safetensors", metadata={"format": "pt"})
    if preprocessor_config is not None:
        (output / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config, indent=2, sort_keys=True) + "\n"
        )
    return output


def convert_to_reference_checkpoint(
    source: str | Path,
    output_dir: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    overwrite: bool = False,
    force_download: bool = False,
) -> Path:
    """Convert a nepa-hf folder (local or Hub id) into the authors' `vit_nepa` layout (nothing is left at
    `output_dir` when it fails)."""
    output = Path(output_dir).expanduser()
    with _staged_output(output, overwrite) as staging:
        config, state_dict, processor = load_nepa_checkpoint(
            source, revision=revision, token=token, force_download=force_download
        )
        reference_config, reference_state_dict = convert_to_reference(state_dict, config)
        save_reference_checkpoint(
            reference_config, reference_state_dict, staging, reference_preprocessor_config(processor, config)
        )
    return output


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nepa_hf.models.nepa.convert_nepa",
        description="Convert the authors' NEPA checkpoints (vit_nepa) to nepa-hf, or back with --to-reference.",
    )
    parser.add_argument(
        "--input", required=True, help="Local folder or Hub repo id (e.g. SixAILab/nepa-base-patch14-224)."
    )
    parser.add_argument("--output", required=True, help="Folder to write.")
    parser.add_argument("--ema", action="store_true", help=f"Convert the EMA weights ({REFERENCE_EMA_FILE}).")
    parser.add_argument("--to-reference", action="store_true", help="Convert a nepa-hf folder to the authors' layout.")
    parser.add_argument(
        "--qk-norm-affine",
        action="store_true",
        help="Give a non-affine QK-norm source learnable QK-norm weights (initialised to 1.0, same outputs).",
    )
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --input.")
    parser.add_argument(
        "--token", default=None, help="Hub token for private repos (default: HF_TOKEN or `hf auth login`)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output folder.")
    parser.add_argument(
        "--force-download",
        action="store_true",
        help="Download a Hub --input again even if it is cached (e.g. after an interrupted download).",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not logger.handlers and not std_logging.getLogger().handlers:
        logging.set_verbosity_warning()
    try:
        if args.to_reference:
            if args.ema or args.qk_norm_affine:
                raise ConversionError("--ema and --qk-norm-affine apply to reference sources, not to --to-reference.")
            output = convert_to_reference_checkpoint(
                args.input, args.output, revision=args.revision, token=args.token, overwrite=args.overwrite,
                force_download=args.force_download,
            )  # fmt: skip
            print(f"Wrote the authors' vit_nepa layout to {output}")
        else:
            output = convert_reference_checkpoint(
                args.input,
                args.output,
                ema=args.ema,
                revision=args.revision,
                token=args.token,
                qk_norm_affine=True if args.qk_norm_affine else None,
                overwrite=args.overwrite,
                force_download=args.force_download,
            )
            architecture = json.loads((output / "config.json").read_text())["architectures"][0]
            print(f"Wrote {architecture} to {output}; load it with transformers' Auto classes after `import nepa_hf`.")
    except (ConversionError, OSError) as error:  # OSError: disk full, no permission to write --output, ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
