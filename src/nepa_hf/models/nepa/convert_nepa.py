# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Convert the authors' NEPA checkpoints (`model_type="vit_nepa"`, a local folder or a Hub id) to nepa-hf, and back.

    python -m nepa_hf.models.nepa.convert_nepa --input SixAILab/nepa-base-patch14-224 --output nepa-vit-b [--ema]
    python -m nepa_hf.models.nepa.convert_nepa --input my-nepa --output my-nepa-vit-nepa --to-reference

Every source tensor is consumed, every target filled, values and dtypes are kept, and reference -> nepa-hf ->
reference gives back the source tensors and config.json. `python -m nepa_hf.hub.convert` adds a model card.
"""

import argparse
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub import save_torch_state_dict
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import logging

from .configuration_nepa import NepaConfig
from .image_processing_nepa import NepaImageProcessorPil
from .modeling_nepa import NepaForImageClassification, NepaForPreTraining, NepaModel

logger = logging.get_logger(__name__)

REFERENCE_MODEL_TYPE = "vit_nepa"
REFERENCE_PREFIX = "vit_nepa."  # the authors' task classes hold their backbone as `vit_nepa`,
NEPA_PREFIX = "nepa."  # ours as `nepa`; the bare models have no prefix

# The one key table, the authors' module -> ours, for the bare model (`{}` is the block index), read in both
# directions. A tensor keeps its own name after the module (weight, bias, lambda1, cls_token, mask_token).
KEY_MAPPING = {
    "embeddings": "embeddings",
    "embeddings.patch_embeddings.projection": "embeddings.patch_embeddings.projection",
    "encoder.layer.{}.layernorm_before": "encoder.layers.{}.norm1",
    "encoder.layer.{}.attention.attention.query": "encoder.layers.{}.attention.q_proj",
    "encoder.layer.{}.attention.attention.key": "encoder.layers.{}.attention.k_proj",
    "encoder.layer.{}.attention.attention.value": "encoder.layers.{}.attention.v_proj",
    "encoder.layer.{}.attention.attention.q_norm": "encoder.layers.{}.attention.q_norm",
    "encoder.layer.{}.attention.attention.k_norm": "encoder.layers.{}.attention.k_norm",
    "encoder.layer.{}.attention.output.dense": "encoder.layers.{}.attention.o_proj",
    "encoder.layer.{}.layer_scale": "encoder.layers.{}.layer_scale1",
    "encoder.layer.{}.layernorm_after": "encoder.layers.{}.norm2",
    "encoder.layer.{}.intermediate.up_proj": "encoder.layers.{}.mlp.up_proj",
    "encoder.layer.{}.intermediate.gate_proj": "encoder.layers.{}.mlp.gate_proj",
    "encoder.layer.{}.output.dense": "encoder.layers.{}.mlp.down_proj",
    "encoder.layer.{}.output.layer_scale": "encoder.layers.{}.layer_scale2",
    "layernorm": "norm",
}
HEAD_KEYS = ("fc_norm.weight", "fc_norm.bias", "classifier.weight", "classifier.bias")  # the same on both sides
ARCHITECTURES = {"ViTNepaModel": "NepaModel", "ViTNepaForPreTraining": "NepaForPreTraining",
                 "ViTNepaForImageClassification": "NepaForImageClassification"}
NEPA_CLASSES = {cls.__name__: cls for cls in (NepaModel, NepaForPreTraining, NepaForImageClassification)}

# The config mapping. The defaults of the authors' `ViTNepaConfig`: what a field left out of their config.json means.
REFERENCE_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "use_gated_mlp": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "rope_theta": 100.0, "image_size": 224, "patch_size": 16,
    "num_channels": 3, "qkv_bias": True, "qk_norm": False, "qk_norm_bias": False, "qk_norm_affine": False,
    "layerscale_value": 1e-5, "drop_path_prob": 0.0, "add_pooling_layer": False, "is_causal": True,
    "pos_embed_shift": None, "pos_embed_jitter": None, "pos_embed_rescale": 2.0,
}
# Fields with the same name and meaning in `NepaConfig`. Of the others, drop_path_prob is our drop_path_rate,
# add_pooling_layer is pooling == "mean", the weights decide qk_norm and layerscale_value (the authors' code builds
# QK-norm and LayerScale whatever these say), and is_causal is ours unless it is their pretraining default (below).
SAME_NAME_FIELDS = [name for name in REFERENCE_DEFAULTS if name not in
                    ("drop_path_prob", "add_pooling_layer", "qk_norm", "layerscale_value", "is_causal")]
# Fields that change what the model computes: a value remembered from the source config never overrides them.
LIVE_FIELDS = frozenset(REFERENCE_DEFAULTS) - {"qk_norm", "layerscale_value"} | {"id2label", "label2id"}
# Settings shared by `ViTImageProcessor` (the authors') and `NepaImageProcessorPil`.
PROCESSOR_FIELDS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                    "image_std", "do_convert_rgb")
# Weight files in order of preference, in groups: a Hub id downloads the next group only if the repo has none of one.
WEIGHT_FILES = [("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json")]
REFERENCE_EMA_FILE = "pytorch_model_ema.bin"
# The config field that decides whether a family of tensors exists (for the hint when the two disagree).
FIELD_OF_TENSORS = {r"[qk]_norm\.weight$": "qk_norm_affine", r"gate_proj\.": "use_gated_mlp",
                    r"layer_scale": "layerscale_value (null: no LayerScale)", r"^classifier\.": "architectures"}


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message says what is wrong and how to fix it."""


def _rename(key: str, table: dict[str, str]) -> str | None:
    """`key` with its module renamed by `table` (KEY_MAPPING or its inverse); `None` where the table has no entry."""
    module, _, tensor = key.rpartition(".")
    block = re.search(r"\.(\d+)\.", module)
    target = table.get(re.sub(r"\.\d+\.", ".{}.", module, count=1))
    return None if target is None else f"{target.format(block[1] if block else '')}.{tensor}"


def nepa_key_to_reference(key: str) -> str | None:
    """One bare-model key of ours (no `nepa.` prefix) -> the authors'; `None` where KEY_MAPPING has no entry."""
    return _rename(key, {ours: theirs for theirs, ours in KEY_MAPPING.items()})


def _match(state_dict: dict, rename, config: NepaConfig, title: str, fill=None) -> dict:
    """`state_dict` renamed and checked against our model's tensors (names, shapes); `fill(unfilled names, shapes)` may
    add tensors. Raises `ConversionError` listing every source tensor without a place, every unfilled target tensor
    and every shape mismatch."""
    with torch.device("meta"):  # no memory, no init
        expected = {k: v.shape for k, v in NEPA_CLASSES[_architecture_of(config)](config).state_dict().items()}
    renamed, source_of, unexpected = {}, {}, []
    for key, tensor in state_dict.items():
        target = rename(key)
        if target is None or target not in expected or target in renamed:
            unexpected.append(key)
        else:
            renamed[target], source_of[target] = tensor, key
    renamed.update(fill({name: shape for name, shape in expected.items() if name not in renamed}) if fill else {})
    missing = [name for name in expected if name not in renamed]
    mismatched = [f"{source_of[name]} {tuple(tensor.shape)}" + (f" -> {name}" if source_of[name] != name else "")
                  + f" expects {tuple(expected[name])}" for name, tensor in renamed.items()
                  if tensor.shape != expected[name]]
    if not (unexpected or missing or mismatched):
        return {name: renamed[name] for name in expected}

    def listing(heading, items, limit=25):
        more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
        lines = "".join(f"\n    {item}" for item in sorted(items)[:limit])
        return f"\n{heading} ({len(items)}):{lines}{more}" if items else ""

    # A tensor family missing or left over means the config disagrees with the weights: name the field to fix.
    fields = sorted({field for key in unexpected + missing for pattern, field in FIELD_OF_TENSORS.items()
                     if re.search(pattern, key)})
    raise ConversionError(title + listing("Source tensors with no place in the target", unexpected)
                          + listing("Target tensors not filled", missing) + listing("Shape mismatches", mismatched)
                          + (f"\nHint: check {', '.join(fields)} in the config against the weights." if fields else ""))


def convert_reference_state_dict(state_dict: dict, reference_config, *, qk_norm_affine: bool | None = None):
    """The authors' state dict and config (dict or config object) -> (`NepaConfig` naming the class that matches
    theirs in `architectures`, our state dict), tensors unchanged. `qk_norm_affine=True` gives a non-affine QK-norm
    source QK-norm weights 1.0 (the same function); by default the config mirrors the source."""
    reference_config = reference_config.to_dict() if hasattr(reference_config, "to_dict") else dict(reference_config)
    config = nepa_config_from_reference(reference_config, state_dict, qk_norm_affine)
    prefix = "" if config.architectures == ["NepaModel"] else NEPA_PREFIX

    def rename(key):
        mapped = _rename(key.removeprefix(REFERENCE_PREFIX), KEY_MAPPING)
        return key if key in HEAD_KEYS else None if mapped is None else prefix + mapped

    def qk_norm_at_identity(unfilled):  # weight 1 and bias 0: exactly the non-affine normalisation
        if not qk_norm_affine or any(re.search(r"\.[qk]_norm\.weight$", key) for key in state_dict):
            return {}
        dtype = next(iter(state_dict.values())).dtype
        return {name: (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
                for name, shape in unfilled.items() if re.search(r"\.[qk]_norm\.(weight|bias)$", name)}

    source = next(theirs for theirs, ours in ARCHITECTURES.items() if [ours] == config.architectures)
    converted = _match(state_dict, rename, config, f"Cannot convert this {source} checkpoint to "
                       f"{config.architectures[0]}:", qk_norm_at_identity)
    if getattr(config, "dtype", None) is None and converted:
        config.dtype = next(iter(converted.values())).dtype  # the written weights carry one: record it
    extras = _reference_extras(reference_config, config, {"qk_norm_affine"} if qk_norm_affine is not None else set())
    if extras:
        config.reference_extras = extras
    return config, converted


def convert_to_reference(state_dict: dict, config: NepaConfig) -> tuple[dict, dict]:
    """Our state dict and `NepaConfig` -> (the authors' config dict, their state dict), tensors unchanged."""
    reference_config = reference_config_from_nepa(config)
    if not config.pretraining_shift or not config.pretraining_stop_gradient:
        logger.warning("The authors' config cannot express the pretraining_shift/pretraining_stop_gradient ablations.")
    if config.layerscale_value is None:
        logger.warning("This model has no LayerScale, which the authors' current code always builds: it will not load "
                       "these weights as they are.")
    architecture = _architecture_of(config)
    prefix = "" if architecture == "NepaModel" else REFERENCE_PREFIX
    checked = _match(state_dict, lambda key: key, config, f"Cannot convert this {architecture} state dict to the "
                     "authors' layout:")  # so every key is one of our model's, all of which KEY_MAPPING covers
    return reference_config, {key if key in HEAD_KEYS else prefix + nepa_key_to_reference(key.removeprefix(NEPA_PREFIX))
                              : tensor for key, tensor in checked.items()}


def _check_model_type(config: dict, expected: str = REFERENCE_MODEL_TYPE) -> None:
    model_type = config.get("model_type", REFERENCE_MODEL_TYPE)
    if model_type != expected:
        hint = (" It is already a nepa-hf checkpoint: load it with AutoModel, or pass --to-reference for the authors' "
                "layout." if model_type == NepaConfig.model_type else "")
        raise ConversionError(f"Expected model_type {expected!r}, got {model_type!r}.{hint}")


def _square(name: str, value):
    """The authors allow image_size/patch_size as [h, w]; NepaConfig stores one int."""
    if isinstance(value, (list, tuple)) and (len(value) != 2 or value[0] != value[1]):
        raise ConversionError(f"Reference {name}={list(value)} is not square; NepaConfig needs a single int. "
                              "(Inputs of any size divisible by the patch size still work at run time.)")
    return value[0] if isinstance(value, (list, tuple)) else value


def _architecture_of(config: NepaConfig) -> str:
    known = [name for name in config.architectures or [] if name in NEPA_CLASSES]
    if config.architectures and not known:
        raise ConversionError(f"Architecture {config.architectures} has no counterpart in the authors' code, which "
                              f"provides {sorted(NEPA_CLASSES)} only.")
    return known[0] if known else "NepaModel"


def nepa_config_from_reference(reference_config: dict, state_dict: dict, qk_norm_affine: bool | None = None):
    """The authors' config dict, with what their weights show, -> `NepaConfig` (architecture included)."""
    _check_model_type(reference_config)

    def field(name):
        return reference_config.get(name, REFERENCE_DEFAULTS[name])

    classifier = state_dict.get("classifier.weight")
    named = [name for name in reference_config.get("architectures") or [] if name in ARCHITECTURES]
    if reference_config.get("architectures") and not named:
        raise ConversionError(f"Unknown reference architecture {reference_config['architectures']}; expected one "
                              f"of {sorted(ARCHITECTURES)}.")
    architecture = (named[0] if named else "ViTNepaForImageClassification" if classifier is not None
                    else "ViTNepaForPreTraining" if any(k.startswith(REFERENCE_PREFIX) for k in state_dict)
                    else "ViTNepaModel")
    has_layer_scale = any(key.endswith("layer_scale.lambda1") for key in state_dict)  # the weights decide
    layerscale_value = field("layerscale_value") or (REFERENCE_DEFAULTS["layerscale_value"] if has_layer_scale
                                                     else None)
    if not field("qk_norm"):
        logger.warning("The source config says qk_norm=false, a flag the authors' code ignores (it always applies "
                       "QK-norm): converting with qk_norm=True; --to-reference restores the flag.")

    kwargs = {name: field(name) for name in SAME_NAME_FIELDS}
    kwargs.update(
        image_size=_square("image_size", kwargs["image_size"]), patch_size=_square("patch_size", kwargs["patch_size"]),
        drop_path_rate=field("drop_path_prob"), pooling="mean" if field("add_pooling_layer") else "last",
        qk_norm=True, layerscale_value=layerscale_value, architectures=[ARCHITECTURES[architecture]],
        use_mask_token=any(key.endswith("embeddings.mask_token") for key in state_dict),
        # Their pretraining models are causal by definition: left unset, so that a head built from the converted
        # folder fine-tunes bidirectionally as ours do. Anything else (their classifier's one flag) is kept as set.
        is_causal=None if architecture != "ViTNepaForImageClassification" and field("is_causal") is True
        else field("is_causal"),
    )
    if qk_norm_affine is not None:
        kwargs["qk_norm_affine"] = qk_norm_affine
    for name in ("id2label", "label2id", "problem_type", "dtype", "torch_dtype"):  # PreTrainedConfig's own fields
        if reference_config.get(name) is not None:
            kwargs[name.removeprefix("torch_")] = reference_config[name]
    if "id2label" not in kwargs and classifier is not None:
        kwargs["num_labels"] = classifier.shape[0]
    try:
        return NepaConfig(**kwargs)
    except (ValueError, TypeError, StrictDataclassError) as error:  # StrictDataclassError: NepaConfig's validation
        raise ConversionError(f"The reference config cannot be expressed as a NepaConfig: {error}") from error


def reference_config_from_nepa(config: NepaConfig, apply_extras: bool = True) -> dict:
    """`NepaConfig` -> the authors' config dict. `config.reference_extras` (kept by the forward conversion) restores
    what the source config.json held beyond the mapped fields, so a converted checkpoint goes back to exactly it."""
    if not config.qk_norm:
        raise ConversionError("This model has qk_norm=False, but the authors' implementation always applies QK-norm "
                              "(their `qk_norm` flag is not read by their code), so it cannot be expressed in their "
                              "layout.")
    architecture = _architecture_of(config)
    reference = {name: getattr(config, name) for name in SAME_NAME_FIELDS}
    reference.update(architectures=[{ours: theirs for theirs, ours in ARCHITECTURES.items()}[architecture]],
                     model_type=REFERENCE_MODEL_TYPE, qk_norm=True, layerscale_value=config.layerscale_value,
                     drop_path_prob=config.drop_path_rate, add_pooling_layer=config.pooling == "mean",
                     transformers_version=transformers.__version__,
                     # Unset, our pretraining models attend causally and our classifier bidirectionally.
                     is_causal=architecture != "NepaForImageClassification" if config.is_causal is None
                     else config.is_causal)
    if architecture == "NepaForImageClassification" or config.id2label != {0: "LABEL_0", 1: "LABEL_1"}:
        reference["id2label"] = {str(index): label for index, label in config.id2label.items()}
        reference["label2id"] = dict(config.label2id)
    if config.problem_type is not None:
        reference["problem_type"] = config.problem_type
    if getattr(config, "dtype", None) is not None:
        reference["torch_dtype"] = str(config.dtype).removeprefix("torch.")

    extras = (getattr(config, "reference_extras", None) or {}) if apply_extras else {}
    for name, value in (extras.get("fields") or {}).items():
        meaning = _square(name, value) if name in ("image_size", "patch_size") else value  # [16, 16] means 16
        if name in LIVE_FIELDS and meaning != reference.get(name):
            logger.warning(f"Ignoring the stored reference value {name}={value!r}: the model now has "
                           f"{reference.get(name)!r}.")  # changed after conversion (e.g. a new image size)
        else:
            reference[name] = value
    for name in extras.get("absent") or []:
        if name not in LIVE_FIELDS or reference.get(name) == REFERENCE_DEFAULTS.get(name):
            reference.pop(name, None)  # leaving a live field out is only safe where their default means the same
    return dict(sorted(reference.items()))


def _reference_extras(reference_config: dict, config: NepaConfig, overridden: set[str]) -> dict:
    """What the source config.json holds beyond what `config` maps back to, for an exact round trip."""
    canonical = reference_config_from_nepa(config, apply_extras=False)
    skip = {"transformers_version"} | overridden  # the writer records its own version; overrides must not come back
    fields = {name: value for name, value in reference_config.items()
              if name not in skip and (name not in canonical or canonical[name] != value)}
    unknown = sorted(set(fields) - set(REFERENCE_DEFAULTS) - set(transformers.PreTrainedConfig().to_dict()))
    if unknown:
        logger.warning(f"The source config has fields this conversion does not read: {unknown}. They do not affect "
                       "the converted model and are kept only to write them back with --to-reference.")
    absent = sorted(name for name in canonical if name not in reference_config and name != "transformers_version")
    return {key: value for key, value in (("fields", fields), ("absent", absent)) if value}


def image_processor_from_reference(preprocessor_config: dict | None, config: NepaConfig) -> NepaImageProcessorPil:
    """The source's preprocessing as a `NepaImageProcessorPil`; without one, the released checkpoints' (a straight
    resize to the model's image size, bilinear, mean = std = 0.5: `NepaImageProcessorPil`'s defaults)."""
    settings = {name: value for name, value in (preprocessor_config or {}).items()
                if name in PROCESSOR_FIELDS + ("do_center_crop", "crop_size") and value is not None}
    size = settings.pop("size", config.image_size)
    return NepaImageProcessorPil(size={"height": size, "width": size} if isinstance(size, int) else size, **settings)


def reference_preprocessor_config(processor: NepaImageProcessorPil | None, config: NepaConfig) -> dict:
    """A `ViTImageProcessor` config (the authors' processor class) with the same preprocessing."""
    settings = (processor or image_processor_from_reference(None, config)).to_dict()
    if settings.get("do_center_crop"):
        logger.warning("ViTImageProcessor has no centre crop: the authors' processor config will resize only.")
    result = {name: settings.get(name) for name in PROCESSOR_FIELDS} | {"image_processor_type": "ViTImageProcessor"}
    result["resample"] = int(result["resample"]) if result["resample"] is not None else None
    return dict(sorted(result.items()))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from None


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        loaded = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except pickle.UnpicklingError as error:
        raise ConversionError(f"Could not read {path} safely with torch.load(weights_only=True): it holds objects "
                              f"other than tensors, or is damaged. {error}") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, struct.error) as error:  # usually an interrupted download
        in_hub_cache = path.absolute().is_relative_to(Path(huggingface_hub.constants.HF_HUB_CACHE).absolute())
        fix = ("rerun with --force-download to download it again (force_download=True in Python)" if in_hub_cache
               else "copy or download it again, or convert another checkpoint")
        raise ConversionError(f"Cannot read the weights in {path} ({path.stat().st_size:,} bytes): the file is "
                              f"truncated or corrupt ({error}). Fix: {fix}.") from None
    # Training checkpoints and EMA helpers wrap the state dict; DDP and EMA wrappers prefix "module.".
    wrappers = ("state_dict", "model", "module", "ema", "model_ema", "state_dict_ema")
    for state_dict in [loaded, *(loaded.get(key) for key in wrappers)] if isinstance(loaded, dict) else []:
        if isinstance(state_dict, dict) and state_dict and all(torch.is_tensor(t) for t in state_dict.values()):
            if all(key.startswith("module.") for key in state_dict):
                state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
            return state_dict
    raise ConversionError(f"{path} does not contain a state dict (a mapping of names to tensors).")


def _load_checkpoint(source, weight_files: list[tuple[str, ...]], model_type: str, revision, token, force_download):
    """(folder, config dict, state dict) of a local folder or a Hub id, of which only config.json, the processor
    config and one group of `weight_files` (as in WEIGHT_FILES) are downloaded."""
    for group in weight_files:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            shards = [name.removesuffix(".index.json").replace(".", "-*.", 1) for name in group if ".index" in name]
            try:
                folder = Path(huggingface_hub.snapshot_download(
                    str(source), revision=revision, token=token, force_download=force_download,
                    allow_patterns=["config.json", "preprocessor_config.json", *group, *shards]))  # fmt: skip
            except (ValueError, OSError) as error:  # the Hub's message says which: bad id, not found, offline, ...
                raise ConversionError(f"{source} is not a local folder, and the Hub could not provide it: "
                                      f"{error}") from None
        files_there = f"Files there: {sorted(p.name for p in folder.iterdir())}."
        config = _read_json(folder / "config.json")
        _check_model_type(config, model_type)
        name = next((name for name in group if (folder / name).exists()), None)
        if name is not None:
            index = name.endswith(".index.json")
            files = sorted(set(_read_json(folder / name).get("weight_map", {}).values())) if index else [name]
            if any(not (folder / file).exists() for file in files):
                raise ConversionError(f"Shards listed in {name} are missing from {folder}. {files_there}")
            return folder, config, {k: v for file in files for k, v in _load_weight_file(folder / file).items()}
    looked_for = ", ".join(name for group in weight_files for name in group)
    raise ConversionError(f"No weights in {folder} (looked for {looked_for}). {files_there}")


@contextmanager
def _staged_output(output: Path, overwrite: bool):
    """A temporary folder beside `output` to write into. On success its files move into `output` (a rename when the
    folder is new; in a folder the user had, ours replace theirs of the same name); on any failure it is removed,
    so a failed conversion leaves neither an empty nor a half-written output folder."""
    if output.exists() and not (output.is_dir() and (overwrite or not any(output.iterdir()))):
        raise ConversionError(f"Output {output} is a file or a folder that is not empty; choose another folder, or "
                              "pass --overwrite to write into this one.")
    anchor = output.parent  # missing parents are created only once the conversion has succeeded
    while not anchor.exists():
        anchor = anchor.parent
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.partial-", dir=anchor, ignore_cleanup_errors=True) as tmp:
        staging = Path(tmp)
        yield staging
        if output.is_dir():
            for item in staging.iterdir():
                if (output / item.name).is_dir() and not (output / item.name).is_symlink():
                    shutil.rmtree(output / item.name)
                os.replace(item, output / item.name)
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, output)  # a rename: the staging folder is beside the output


def convert_reference_checkpoint(source, output_dir, *, ema=False, revision=None, token=None, qk_norm_affine=None,
                                 overwrite=False, force_download=False, finish=None) -> Path:
    """Convert the authors' checkpoint (local folder or Hub id; `ema=True`: its `pytorch_model_ema.bin`) into a
    nepa-hf folder that the Auto classes load: weights (safetensors, values and dtypes kept), config, model code with
    its auto_map, processor config. `finish(folder, config)` may add files before the folder moves into place
    (`nepa_hf.hub.convert` writes the model card and every head's remote code). Nothing is left at `output_dir` when
    it fails."""
    output = Path(output_dir).expanduser()
    with _staged_output(output, overwrite) as staging:
        folder, reference_config, reference_state_dict = _load_checkpoint(
            source, [(REFERENCE_EMA_FILE,)] if ema else WEIGHT_FILES, REFERENCE_MODEL_TYPE, revision, token,
            force_download)  # fmt: skip
        config, state_dict = convert_reference_state_dict(reference_state_dict, reference_config,
                                                          qk_norm_affine=qk_norm_affine)
        with torch.device("meta"):
            model = NEPA_CLASSES[_architecture_of(config)](config)
        model.load_state_dict(state_dict, strict=True, assign=True)  # the model holds the source tensors themselves
        model.save_pretrained(staging)
        preprocessor = folder / "preprocessor_config.json"
        image_processor_from_reference(_read_json(preprocessor) if preprocessor.exists() else None,
                                       config).save_pretrained(staging)
        if finish is not None:
            finish(staging, config)
    return output


def convert_to_reference_checkpoint(source, output_dir, *, revision=None, token=None, overwrite=False,
                                    force_download=False) -> Path:
    """Convert a nepa-hf folder (local or Hub id) into the authors' `vit_nepa` layout: config.json (their fields),
    model.safetensors (their keys), a `ViTImageProcessor` config. Nothing is left at `output_dir` when it fails."""
    output = Path(output_dir).expanduser()
    with _staged_output(output, overwrite) as staging:
        folder, _, state_dict = _load_checkpoint(source, WEIGHT_FILES[:1], NepaConfig.model_type, revision, token,
                                                 force_download)
        config = NepaConfig.from_pretrained(folder)
        processor = NepaImageProcessorPil.from_pretrained(folder) if (
            folder / "preprocessor_config.json").exists() else None
        reference_config, reference_state_dict = convert_to_reference(state_dict, config)
        save_torch_state_dict(reference_state_dict, staging, max_shard_size="50GB")  # one file, as save_pretrained
        for name, content in (("config.json", reference_config),
                              ("preprocessor_config.json", reference_preprocessor_config(processor, config))):
            (staging / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return output


def main(argv=None, *, prog="python -m nepa_hf.models.nepa.convert_nepa", convert=convert_reference_checkpoint) -> int:
    """The command line: 0, or 2 with one line on stderr. `convert` does the forward direction (the Hub tools pass
    one that also writes the model card)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="Local folder or Hub id, e.g. SixAILab/nepa-base-patch14-224.")
    parser.add_argument("--output", required=True, help="Folder to write.")
    parser.add_argument("--ema", action="store_true", help=f"Convert the EMA weights ({REFERENCE_EMA_FILE}).")
    parser.add_argument("--to-reference", action="store_true", help="Convert a nepa-hf folder to the authors' layout.")
    parser.add_argument("--qk-norm-affine", action="store_true", help="Non-affine QK-norm source: add its weights "
                        "at 1.0 (same outputs).")
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of --input.")
    parser.add_argument("--token", help="Hub token for private repos (default: HF_TOKEN or `hf auth login`).")
    parser.add_argument("--overwrite", action="store_true", help="Write into a non-empty --output folder.")
    parser.add_argument("--force-download", action="store_true", help="Download a cached Hub --input again.")
    args = parser.parse_args(argv)
    hub = dict(revision=args.revision, token=args.token, overwrite=args.overwrite, force_download=args.force_download)
    try:
        if args.to_reference:
            if args.ema or args.qk_norm_affine:
                raise ConversionError("--ema and --qk-norm-affine apply to reference sources, not to --to-reference.")
            output = convert_to_reference_checkpoint(args.input, args.output, **hub)
            print(f"Wrote the authors' vit_nepa layout to {output}")
        else:
            output = convert(args.input, args.output, ema=args.ema,
                             qk_norm_affine=True if args.qk_norm_affine else None, **hub)
            architecture = json.loads((output / "config.json").read_text())["architectures"][0]
            print(f"Wrote {architecture} to {output}; load it with transformers' Auto classes after `import nepa_hf`.")
    except (ConversionError, OSError, StrictDataclassError) as error:  # OSError: disk full, no permission, ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
