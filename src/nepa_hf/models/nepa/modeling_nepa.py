# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch NEPA (Next-Embedding Predictive Autoregression) Vision Transformer.

A plain ViT with a CLS token, no absolute position embedding, 2D RoPE on the patch tokens, QK-norm and
LayerScale. Pretraining predicts the next patch's input embedding (stop-gradient, negative cosine).
Reading order follows transformers' `dinov3_vit`: outputs, embeddings, RoPE, attention, MLP, block, encoder, models.

This file is copied next to saved checkpoints for `trust_remote_code=True` users, so it imports only torch,
transformers and its sibling `configuration_nepa.py`.
"""

import glob
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GradientCheckpointingLayer, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging

from .configuration_nepa import NepaConfig, saved_by_finetuning_model

# Internal transformers helpers that moved between 5.x releases: import defensively.
try:
    from transformers.utils.output_capturing import capture_outputs
except ImportError:  # pragma: no cover - older 5.x
    from transformers.utils.generic import check_model_inputs as capture_outputs
try:
    from transformers.utils.generic import can_return_tuple
except ImportError:  # pragma: no cover
    from transformers.utils import can_return_tuple
try:
    from transformers.pytorch_utils import compile_compatible_method_lru_cache
except ImportError:  # pragma: no cover
    from functools import lru_cache as compile_compatible_method_lru_cache

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------- Outputs


@dataclass
class NepaModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus `input_embeddings`: [CLS; patch embeddings] as they enter the first block
    (before masking and dropout), i.e. the pretraining targets."""

    input_embeddings: torch.FloatTensor | None = None


@dataclass
class NepaForPreTrainingOutput(ModelOutput):
    """Output of `NepaForPreTraining`.

    Args:
        loss: negative cosine similarity between predictions and next-position targets, in [-1, 1].
        last_hidden_state: the predictions, `(batch, 1 + num_patches, hidden)`; position t predicts t + 1.
        input_embeddings: the targets (detached when `pretraining_stop_gradient`), same shape.
        pooler_output: pooled features of the backbone.
        hidden_states, attentions: as requested with `output_hidden_states` / `output_attentions`.
    """

    loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    input_embeddings: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


# -------------------------------------------------------------------------------------------------------- Embeddings


class NepaPatchEmbeddings(nn.Module):
    """Conv2d patchifier, flattened row-major (rows slow, columns fast)."""

    def __init__(self, config: NepaConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class NepaEmbeddings(nn.Module):
    """[CLS; patch embeddings]. There is no absolute position embedding: positions come from RoPE."""

    def __init__(self, config: NepaConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_mask_token else None
        self.patch_embeddings = NepaPatchEmbeddings(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden_states entering block 0, clean input embeddings used as targets)."""
        patches = self.patch_embeddings(pixel_values)
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        input_embeddings = torch.cat([cls, patches], dim=1)

        hidden_states = input_embeddings
        if bool_masked_pos is not None:
            if self.mask_token is None:
                raise ValueError(
                    "bool_masked_pos was given but the model has no mask token. Build it with "
                    "`use_mask_token=True` in the config."
                )
            if bool_masked_pos.shape != patches.shape[:2]:
                raise ValueError(
                    f"bool_masked_pos must have shape (batch, num_patches) = {tuple(patches.shape[:2])}, "
                    f"got {tuple(bool_masked_pos.shape)}."
                )
            masked = torch.where(
                bool_masked_pos.unsqueeze(-1), self.mask_token.to(patches.dtype).expand_as(patches), patches
            )
            hidden_states = torch.cat([cls, masked], dim=1)
        return self.dropout(hidden_states), input_embeddings


# -------------------------------------------------------------------------------------------------------------- RoPE


def patch_center_coordinates(num_patches_h: int, num_patches_w: int, device: torch.device) -> torch.Tensor:
    """(h*w, 2) patch-centre coordinates (y, x) in [-1, 1], row-major, float32."""
    coords_h = (torch.arange(num_patches_h, dtype=torch.float32, device=device) + 0.5) / num_patches_h
    coords_w = (torch.arange(num_patches_w, dtype=torch.float32, device=device) + 0.5) / num_patches_w
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    return 2.0 * coords - 1.0


def augment_patch_coordinates(
    coords: torch.Tensor, shift: float | None, jitter: float | None, rescale: float | None
) -> torch.Tensor:
    """Training-time coordinate augmentation of the reference (one draw per forward, shared by the batch)."""
    if shift:
        coords = coords + torch.empty(1, 2, device=coords.device).uniform_(-shift, shift)
    if jitter:
        log_jitter = math.log(jitter)
        coords = coords * torch.empty(1, 2, device=coords.device).uniform_(-log_jitter, log_jitter).exp()
    if rescale:
        log_rescale = math.log(rescale)
        coords = coords * torch.empty(1, device=coords.device).uniform_(-log_rescale, log_rescale).exp()
    return coords


class NepaRopePositionEmbedding(nn.Module):
    """2D RoPE tables (cos, sin) for [CLS; patches], each (1 + h*w, head_dim).

    Angles are `2*pi*coord*inv_freq` with `inv_freq[k] = theta^(-4k/d)`: d/4 angles for y then d/4 for x, the d/2
    vector repeated twice (rotate-half layout). CLS is never rotated: its row is the identity (cos 1, sin 0), which
    is bit-exact with leaving it out. Computed in float32 with autocast off, then cast; cached per grid in eval.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: NepaConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.compute_inv_freq(config), persistent=False)

    @staticmethod
    def compute_inv_freq(config: NepaConfig) -> torch.Tensor:
        exponents = torch.arange(config.head_dim // 4, dtype=torch.float32) * 4 / config.head_dim
        return 1.0 / config.rope_theta**exponents

    def forward(
        self, num_patches_h: int, num_patches_w: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if self.training and (config.pos_embed_shift or config.pos_embed_jitter or config.pos_embed_rescale):
            return self._tables(num_patches_h, num_patches_w, device, dtype, augment=True)
        return self._cached_tables(num_patches_h, num_patches_w, device, dtype)

    @compile_compatible_method_lru_cache(maxsize=8)
    def _cached_tables(self, num_patches_h: int, num_patches_w: int, device: torch.device, dtype: torch.dtype):
        # Normal (non-inference) tensors, so a later forward with autograd can save them for backward.
        with torch.inference_mode(False), torch.no_grad():
            return self._tables(num_patches_h, num_patches_w, device, dtype, augment=False)

    def _tables(self, num_patches_h, num_patches_w, device, dtype, augment: bool):
        with torch.autocast(device_type=device.type, enabled=False):
            coords = patch_center_coordinates(num_patches_h, num_patches_w, device)
            if augment:
                config = self.config
                coords = augment_patch_coordinates(
                    coords, config.pos_embed_shift, config.pos_embed_jitter, config.pos_embed_rescale
                )
            angles = 2 * math.pi * coords[:, :, None] * self.inv_freq.float()[None, None, :]  # (hw, 2, d/4)
            angles = torch.cat([angles.new_zeros(1, angles.shape[1] * angles.shape[2]), angles.flatten(1, 2)])
            angles = angles.tile(2)  # (1 + hw, d); the CLS row is all zeros
            cos, sin = angles.cos(), angles.sin()
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k of shape (B, H, N, d) with tables (N, d)."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# --------------------------------------------------------------------------------------------------------- Attention


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


_CAUSAL_FLAG_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")


def _causal_mask_mod(batch_idx, head_idx, q_idx, kv_idx):
    return q_idx >= kv_idx


def build_attention_mask(
    attn_implementation: str, is_causal: bool, seq_len: int, dtype: torch.dtype, device: torch.device
):
    """The mask each attention backend needs, built once per forward (never per layer).

    sdpa and flash attention take the `is_causal` flag (no mask tensor); flex attention takes a BlockMask; eager and
    custom backends take an additive (seq, seq) mask.
    """
    if not is_causal or attn_implementation in _CAUSAL_FLAG_IMPLEMENTATIONS:
        return None
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(_causal_mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(seq_len, seq_len, dtype=dtype, device=device).masked_fill(future, torch.finfo(dtype).min)


class NepaAttention(nn.Module):
    """Multi-head self-attention: q, k, v projections, QK-norm per head, 2D RoPE on q and k, any attention backend
    of transformers' attention interface, output projection."""

    def __init__(self, config: NepaConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        # Backends read this only when a call passes no flag; every NEPA forward passes its model's attention.
        self.is_causal = config.is_causal
        self.dropout = config.attention_probs_dropout_prob
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        if config.qk_norm:
            norm_kwargs = dict(
                eps=config.layer_norm_eps, elementwise_affine=config.qk_norm_affine, bias=config.qk_norm_bias
            )
            self.q_norm = nn.LayerNorm(self.head_dim, **norm_kwargs)
            self.k_norm = nn.LayerNorm(self.head_dim, **norm_kwargs)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask=None,
        is_causal: bool = False,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn_implementation or self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.dropout if self.training else 0.0
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))
        return self.output_dropout(attn_output), attn_weights


# ---------------------------------------------------------------------------------------- LayerScale, drop path, MLP


class NepaLayerScale(nn.Module):
    def __init__(self, config: NepaConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class NepaDropPath(nn.Module):
    """Stochastic depth per sample on the residual branch."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
        return hidden_states * keep / keep_prob

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class NepaMLP(nn.Module):
    """down(act(up(x)))."""

    def __init__(self, config: NepaConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act(self.up_proj(hidden_states))))


class NepaGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); SwiGLU when hidden_act is "silu"."""

    def __init__(self, config: NepaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)))


# ---------------------------------------------------------------------------------------------------- Block, encoder


class NepaLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + drop_path(ls1 * attn(LN1(x))), then x + drop_path(ls2 * mlp(LN2(x)))."""

    def __init__(self, config: NepaConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = NepaAttention(config)
        self.layer_scale1 = NepaLayerScale(config) if config.layerscale_value is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = NepaGatedMLP(config) if config.use_gated_mlp else NepaMLP(config)
        self.layer_scale2 = NepaLayerScale(config) if config.layerscale_value is not None else nn.Identity()
        self.drop_path = NepaDropPath(drop_path_rate) if drop_path_rate > 0.0 else nn.Identity()

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask=None,
        is_causal: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attention(
            self.norm1(hidden_states), position_embeddings, attention_mask, is_causal, **kwargs
        )
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(attn_output))
        mlp_output = self.mlp(self.norm2(hidden_states))
        return hidden_states + self.drop_path(self.layer_scale2(mlp_output))


class NepaEncoder(nn.Module):
    def __init__(self, config: NepaConfig):
        super().__init__()
        # Linear from 0 at the first block to drop_path_rate at the last (plain floats: safe on the meta device).
        last = max(config.num_hidden_layers - 1, 1)
        rates = [config.drop_path_rate * i / last for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList([NepaLayer(config, rate) for rate in rates])

    def forward(self, hidden_states, position_embeddings, attention_mask=None, is_causal=False, **kwargs):
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings, attention_mask, is_causal, **kwargs)
        return hidden_states


# ------------------------------------------------------------------------------------------------------------ Models


_QK_NORM_WEIGHT = re.compile(r"(^|\.)[qk]_norm\.weight$")


def _saved_qk_norm_affine(load_config) -> bool | None:
    """`qk_norm_affine` of the config saved with the checkpoint being loaded (same revision), None if unreadable."""
    if load_config.pretrained_model_name_or_path is None:
        return None
    download_kwargs = {**(load_config.download_kwargs or {}), "force_download": False}
    try:
        return NepaConfig.from_pretrained(load_config.pretrained_model_name_or_path, **download_kwargs).qk_norm_affine
    except (OSError, ValueError):
        return None


def safetensors_file_problem(path: str) -> str | None:
    """Why `path` is not a complete safetensors file, or None when its size matches what its header describes.

    Reads the header only (8-byte length, JSON table of tensors with their byte ranges), with the standard library.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                return f"{size} bytes, too short for a safetensors header"
            header_length = int.from_bytes(prefix, "little")
            if 8 + header_length > size:
                return f"{size:,} bytes, cut inside its {header_length:,}-byte header (truncated)"
            header = json.loads(file.read(header_length))
        data_end = max(
            (entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        return f"unreadable safetensors header ({error})"
    expected = 8 + header_length + data_end
    if size < expected:
        return f"{size:,} bytes where its header describes {expected:,} (truncated)"
    if size > expected:
        return f"{size:,} bytes where its header describes {expected:,} (trailing data)"
    return None


def _safetensors_files(pretrained_model_name_or_path, kwargs: dict) -> list[str]:
    """The .safetensors files of a local folder, or of a Hub model's cached snapshot (no download)."""
    subfolder = kwargs.get("subfolder") or ""
    folder = os.path.join(os.fspath(pretrained_model_name_or_path), subfolder)
    if not os.path.isdir(folder):
        try:
            from transformers.utils import cached_file

            config_file = cached_file(
                pretrained_model_name_or_path, "config.json", subfolder=subfolder, cache_dir=kwargs.get("cache_dir"),
                revision=kwargs.get("revision"), local_files_only=True,
                _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            )  # fmt: skip
        except Exception:  # only used to improve an error message: never replace the original error
            config_file = None
        if config_file is None:
            return []
        folder = os.path.dirname(config_file)
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))


def _corrupt_weights_message(pretrained_model_name_or_path, kwargs: dict, error: Exception) -> str:
    problems = [
        f"{path}: {problem}"
        for path in _safetensors_files(pretrained_model_name_or_path, kwargs)
        if (problem := safetensors_file_problem(path)) is not None
    ]
    where = "; ".join(problems) if problems else f"a .safetensors weight file of {pretrained_model_name_or_path}"
    return (
        f"Cannot load the weights of {pretrained_model_name_or_path}: {where}. safetensors reports: {error}. The "
        "file is incomplete or corrupt (e.g. an interrupted download, copy or save): download it again "
        "(from_pretrained(..., force_download=True) for a Hub model) or save the model again with save_pretrained."
    )


def _class_before_fully_shard(cls: type) -> type:
    """The model's own class under FSDP2's dynamic `FSDP<Name>(FSDPModule, Name)` subclass; `cls` otherwise."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed support
        return cls
    if not issubclass(cls, FSDPModule):
        return cls
    return next(base for base in cls.__mro__ if not issubclass(base, FSDPModule))


class NepaPreTrainedModel(PreTrainedModel):
    config: NepaConfig
    config_class = NepaConfig
    base_model_prefix = "nepa"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["NepaEmbeddings", "NepaLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": NepaLayer, "attentions": NepaAttention}
    _input_embed_layer = "patch_embeddings"

    # Which config field sets the attention of a call that passes no `is_causal`: the pretraining models read
    # `config.is_causal`, the fine-tuning models (and the trunk inside them) `config.finetuning_is_causal`.
    is_finetuning_model = False

    # Every Auto class that can load a NEPA folder through `trust_remote_code`, whichever head was saved.
    remote_code_auto_map = {
        "AutoConfig": "configuration_nepa.NepaConfig",
        "AutoModel": "modeling_nepa.NepaModel",
        "AutoModelForPreTraining": "modeling_nepa.NepaForPreTraining",
        "AutoModelForImageClassification": "modeling_nepa.NepaForImageClassification",
    }

    @property
    def default_is_causal(self) -> bool:
        """The attention of a call without `is_causal=`: `config.finetuning_is_causal` for the fine-tuning models
        (`NepaForImageClassification`, `NepaForSemanticSegmentation`, `NepaBackbone` and the `NepaModel` inside
        them), `config.is_causal` for `NepaModel` and `NepaForPreTraining`."""
        return bool(self.config.finetuning_is_causal if self.is_finetuning_model else self.config.is_causal)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with two NEPA additions.

        * A truncated or corrupt `.safetensors` file raises an `OSError` that names the file and the fix (safetensors'
          own error names neither). Every other error passes through unchanged.
        * A `NepaModel` / `NepaForPreTraining` loaded from a folder that a fine-tuning model saved warns when its
          attention (`is_causal`) differs from the one the head was fine-tuned with (`finetuning_is_causal`).
        """
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except Exception as error:
            # Matched by name: safetensors is not among the imports this file may use (see the module docstring).
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(_corrupt_weights_message(pretrained_model_name_or_path, kwargs, error)) from error
        loaded = model[0] if isinstance(model, tuple) else model
        config = loaded.config
        if (
            not loaded.is_finetuning_model
            and saved_by_finetuning_model(config)
            and config.is_causal != config.finetuning_is_causal
        ):
            attention = "causally" if config.is_causal else "bidirectionally"
            logger.warning(
                f"{type(loaded).__name__} attends {attention} (config.is_causal={config.is_causal}, the pretraining "
                f"attention), but {pretrained_model_name_or_path} was saved by {config.architectures[0]}, fine-tuned "
                f"with finetuning_is_causal={config.finetuning_is_causal}. For the features of the fine-tuned model, "
                f"load with is_causal={config.finetuning_is_causal} (pipelines: "
                f"model_kwargs={{'is_causal': {config.finetuning_is_causal}}}) or pass it per call."
            )
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # registered for remote code: advertise all heads, not just this one
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self.remote_code_auto_map}
        # FSDP2's `fully_shard` swaps the class for a dynamic `FSDP<Name>` subclass defined in torch; transformers
        # would copy torch's FSDP source files as this model's remote code and point `auto_map` at them. Save as the
        # model's own class (the weights come from `state_dict`, e.g. `accelerator.get_state_dict`, either way).
        wrapped_class = type(self)
        own_class = _class_before_fully_shard(wrapped_class)
        if own_class is wrapped_class:
            return super().save_pretrained(save_directory, *args, **kwargs)
        self.__class__ = own_class
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapped_class

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Reference init: trunc-normal(std) Linear/Conv weights and CLS, zero biases, LayerNorm (1, 0),
        LayerScale = layerscale_value, zero classifier head."""
        super()._init_weights(module)
        std = self.config.initializer_range
        if module is getattr(self, "classifier", None):
            # Zero head: fine-tuning starts from the pretrained features unchanged.
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            if module.weight is not None:
                init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, NepaEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)
        elif isinstance(module, NepaLayerScale):
            init.constant_(module.lambda1, self.config.layerscale_value)
        elif isinstance(module, NepaRopePositionEmbedding):
            # Non-persistent buffer: recomputed here, otherwise garbage after from_pretrained (meta-device load).
            init.copy_(module.inv_freq, NepaRopePositionEmbedding.compute_inv_freq(self.config))

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        """Missing QK-norm weights are accepted in one known case only: the checkpoint's own config says
        `qk_norm_affine=False` (e.g. the authors' base pretraining checkpoint) and the model is affine, so every
        QK-norm weight is missing. `_init_weights` starts them at 1.0, which computes exactly the non-affine norm.
        Any other missing QK-norm weight is reported like every missing key."""
        expected = {name for name, _ in model.named_parameters() if _QK_NORM_WEIGHT.search(name)}
        missing = {key for key in loading_info.missing_keys if _QK_NORM_WEIGHT.search(key)}
        ignored = model._keys_to_ignore_on_load_missing
        if missing and missing == expected and _saved_qk_norm_affine(load_config) is False:
            logger.info(
                f"{load_config.pretrained_model_name_or_path} has non-affine QK-norm (qk_norm_affine=False): "
                f"starting the {len(missing)} QK-norm weights of this affine model at 1.0 (same outputs)."
            )
            model._keys_to_ignore_on_load_missing = set(ignored or ()) | {f"^{re.escape(key)}$" for key in missing}
        try:
            return PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        finally:
            model._keys_to_ignore_on_load_missing = ignored

    def _attention_backend_for_call(self, kwargs: dict) -> str:
        """Only eager attention materialises attention maps: use it for calls that ask for them."""
        implementation = self.config._attn_implementation
        if kwargs.get("output_attentions", self.config.output_attentions) and implementation != "eager":
            logger.warning_once(
                f"output_attentions=True: computing this call with eager attention instead of {implementation!r}, "
                "which cannot return attention maps. Load with attn_implementation='eager' to silence this."
            )
            return "eager"
        return implementation

    def _run_trunk(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, is_causal: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings, RoPE and blocks (before the final norm), for models holding the trunk's submodules directly
        (`NepaModel`, `NepaBackbone`). Returns (hidden states, clean input embeddings)."""
        self._check_pixel_values(pixel_values)
        is_causal = self.default_is_causal if is_causal is None else is_causal
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden_states, input_embeddings = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
        patch = self.config.patch_size
        grid_h, grid_w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        position_embeddings = self.rope_embeddings(grid_h, grid_w, hidden_states.device, hidden_states.dtype)
        attn_implementation = self._attention_backend_for_call(kwargs)
        attention_mask = build_attention_mask(
            attn_implementation, is_causal, hidden_states.shape[1], hidden_states.dtype, hidden_states.device
        )
        hidden_states = self.encoder(
            hidden_states,
            position_embeddings,
            attention_mask=attention_mask,
            is_causal=is_causal,
            attn_implementation=attn_implementation,
            **kwargs,
        )
        return hidden_states, input_embeddings

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> None:
        config = self.config
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch, channels, height, width) tensor.")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must be 4-D (batch, {config.num_channels}, height, width), got shape "
                f"{tuple(pixel_values.shape)}. Use the image processor to batch single images."
            )
        if not pixel_values.is_floating_point():
            # An error, not a warning: integer pixels are raw 0-255 values that the image processor would rescale
            # and normalise, so a model run on them (e.g. a Trainer fed by an uint8 collator) trains or predicts on
            # inputs ~100x off the scale it was trained on; nothing valid arrives as integers. The dtype is
            # metadata: checking it costs no host sync.
            raise ValueError(
                f"pixel_values has dtype {pixel_values.dtype}, not floating point: integer pixels are raw 0-255 "
                "values, but NEPA takes normalised float pixels. Pass the images through the image processor "
                "(AutoImageProcessor: rescale by 1/255, then normalise), or convert them the same way yourself, e.g. "
                "`(pixel_values.float() / 255 - 0.5) / 0.5` for the released checkpoints' mean = std = 0.5."
            )
        batch_size, channels, height, width = pixel_values.shape
        if batch_size == 0:
            raise ValueError("pixel_values is an empty batch (batch size 0): pass at least one image.")
        if channels != config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels but the model expects {config.num_channels} "
                f"(config.num_channels). Convert images (e.g. to RGB) with the image processor."
            )
        patch = config.patch_size
        if height % patch or width % patch or height == 0 or width == 0:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the patch size {patch}. Resize or crop to a "
                f"multiple of {patch} (e.g. {max(patch, height // patch * patch)}x{max(patch, width // patch * patch)})."
            )


class NepaModel(NepaPreTrainedModel):
    """The bare NEPA ViT: embeddings, RoPE, blocks, final LayerNorm; pooled output per `config.pooling`."""

    def __init__(self, config: NepaConfig, is_finetuning_model: bool = False):
        """`is_finetuning_model`: this is the trunk of a fine-tuning head, so its calls default to the head's
        attention, `config.finetuning_is_causal` (see `default_is_causal`)."""
        super().__init__(config)
        self.is_finetuning_model = is_finetuning_model
        self.embeddings = NepaEmbeddings(config)
        self.rope_embeddings = NepaRopePositionEmbedding(config)
        self.encoder = NepaEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> NepaPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        is_causal: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NepaModelOutput:
        r"""
        pixel_values: (batch, channels, height, width); height and width multiples of the patch size.
        bool_masked_pos: (batch, num_patches) bool; True replaces that patch's input with the mask token.
        is_causal: attention of this call; default `config.is_causal` (`config.finetuning_is_causal` for the trunk
            of a fine-tuning head).
        """
        hidden_states, input_embeddings = self._run_trunk(pixel_values, bool_masked_pos, is_causal, **kwargs)
        sequence_output = self.norm(hidden_states)
        if self.config.pooling == "mean":
            pooled_output = sequence_output[:, 1:].mean(dim=1)
        else:
            pooled_output = sequence_output[:, -1]
        return NepaModelOutput(
            last_hidden_state=sequence_output, pooler_output=pooled_output, input_embeddings=input_embeddings
        )


def nepa_loss(
    predictions: torch.Tensor, targets: torch.Tensor, shift: bool = True, stop_gradient: bool = True
) -> torch.Tensor:
    """Negative cosine similarity between predictions and targets, averaged over batch and positions.

    With `shift` (the method), output t predicts input embedding t + 1: CLS predicts patch 1, CLS is never a
    target, the last output is unused. Without it (ablation), each patch output predicts its own input embedding.
    """
    if stop_gradient:
        targets = targets.detach()
    if shift:
        predictions, targets = predictions[:, :-1], targets[:, 1:]
    else:
        predictions, targets = predictions[:, 1:], targets[:, 1:]
    predictions = F.normalize(predictions.float(), dim=-1)
    targets = F.normalize(targets.float(), dim=-1)
    return -(predictions * targets).sum(dim=-1).mean()


class NepaForPreTraining(NepaPreTrainedModel):
    """NEPA with the next-embedding prediction objective (`nepa_loss` on the backbone's outputs). No extra head."""

    def __init__(self, config: NepaConfig):
        super().__init__(config)
        self.nepa = NepaModel(config)
        self.post_init()

    def get_input_embeddings(self) -> NepaPatchEmbeddings:
        return self.nepa.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        is_causal: bool | None = None,
        return_loss: bool = True,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NepaForPreTrainingOutput:
        r"""
        return_loss: compute the loss (on by default; lets `Trainer.evaluate` report `eval_loss` without labels).
        """
        kwargs.pop("num_items_in_batch", None)  # label-free objective: nothing to normalise by
        outputs = self.nepa(pixel_values, bool_masked_pos=bool_masked_pos, is_causal=is_causal, **kwargs)
        targets = outputs.input_embeddings
        if self.config.pretraining_stop_gradient:
            targets = targets.detach()
        loss = None
        if return_loss:
            config = self.config
            loss = nepa_loss(
                outputs.last_hidden_state, targets, config.pretraining_shift, config.pretraining_stop_gradient
            )
        return NepaForPreTrainingOutput(
            loss=loss, last_hidden_state=outputs.last_hidden_state, input_embeddings=targets,
            pooler_output=outputs.pooler_output, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets (Mixup/CutMix/label smoothing), mean over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class NepaForImageClassification(NepaPreTrainedModel):
    """NEPA with the reference classification head: pooled features, `fc_norm` (mean pooling only), Linear.

    Attention is `config.finetuning_is_causal`, bidirectional unless set (the paper's fine-tuning), whatever the
    source: a config, a pretraining checkpoint (whose `is_causal=True` stays what `NepaModel` uses) or a fine-tuned
    one. For the causal fine-tuning ablation pass `finetuning_is_causal=True` to the config or `from_pretrained`;
    `is_causal=` per call overrides either. A model built from a pretraining checkpoint starts from a zero head.

    Labels: int64 (batch,) class indices in [0, num_labels) (-100 is ignored); float (batch,) regression
    (num_labels 1); float (batch, num_labels) soft targets (soft-target cross-entropy) unless
    `problem_type == "multi_label_classification"` (BCE). Anything else raises a ValueError naming `num_labels`.
    """

    is_finetuning_model = True

    # Trainer: let it average over gradient-accumulation steps (soft targets have no item count).
    accepts_loss_kwargs = False

    def __init__(self, config: NepaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nepa = NepaModel(config, is_finetuning_model=True)
        self.fc_norm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.pooling == "mean" else nn.Identity()
        )
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def get_input_embeddings(self) -> NepaPatchEmbeddings:
        return self.nepa.get_input_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        is_causal: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        labels: see the class docstring.
        is_causal: attention of this call; default `config.finetuning_is_causal`.
        """
        kwargs.pop("num_items_in_batch", None)
        if labels is not None:
            self._check_labels(labels, pixel_values)
        outputs = self.nepa(pixel_values, is_causal=is_causal, **kwargs)
        logits = self.classifier(self.fc_norm(outputs.pooler_output))

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            soft = (
                labels.is_floating_point()
                and labels.shape == logits.shape
                and self.num_labels > 1
                and self.config.problem_type != "multi_label_classification"
            )
            if soft:
                loss = soft_target_cross_entropy(logits, labels)
            else:
                loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _check_labels(self, labels: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        """Shapes and class indices the loss can use, with errors naming `num_labels` (see `check_label_range`
        for when the index range is checked)."""
        num_labels, problem_type = self.num_labels, self.config.problem_type
        if pixel_values is not None and labels.ndim and labels.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"labels has {labels.shape[0]} rows for a batch of {pixel_values.shape[0]} images; expected one "
                "label (or one row of targets) per image."
            )
        if num_labels < 1:
            raise ValueError("This model has num_labels=0 (no classifier): set num_labels or id2label to train it.")
        if num_labels == 1 or problem_type == "regression":
            return
        if labels.is_floating_point() or problem_type == "multi_label_classification":
            if labels.ndim != 2 or labels.shape[-1] != num_labels:
                kind = "multi-hot targets" if problem_type == "multi_label_classification" else "soft targets"
                hint = (
                    " For class indices pass int64 labels of shape (batch,)."
                    if labels.is_floating_point() and labels.ndim == 1
                    else ""
                )
                raise ValueError(
                    f"Float labels are {kind} and must have shape (batch, num_labels) = (batch, {num_labels}), got "
                    f"{tuple(labels.shape)}. The model has num_labels={num_labels}: build the targets with one "
                    f"column per class of config.id2label, or load the model with the dataset's class count "
                    f"(num_labels=..., ignore_mismatched_sizes=True for a fine-tuned head).{hint}"
                )
            return
        if labels.ndim > 1 and labels.numel() != labels.shape[0]:
            raise ValueError(
                f"Integer labels are class indices of shape (batch,), got {tuple(labels.shape)}. For soft targets "
                f"pass float labels of shape (batch, num_labels={num_labels})."
            )
        check_label_range(
            labels,
            num_labels,
            ignore_index=-100,
            fix="Set num_labels (or id2label) to cover every class, e.g. "
            "from_pretrained(..., num_labels=K, ignore_mismatched_sizes=True), or map the labels to 0..num_labels-1.",
        )


def check_label_range(labels: torch.Tensor, num_labels: int, ignore_index: int, fix: str) -> None:
    """Raise a ValueError naming `num_labels` if a label is outside [0, num_labels) and not `ignore_index`.

    A value check that reads the labels on the host would cost a GPU sync every training step. The check is
    `torch._assert_async` instead, which queues it on the device: on CUDA (and under torch.compile) a bad label stops
    the run at the next sync with a device-side assert that prints this message; on the CPU the assert fails at once
    and becomes this ValueError, listing the offending values. Other devices are not checked here (the loss's own
    error applies).
    """
    if torch.jit.is_tracing() or labels.device.type not in ("cpu", "cuda"):
        return
    in_range = ((labels >= 0) & (labels < num_labels)) | (labels == ignore_index)
    problem = (
        f"labels contain class indices outside [0, {num_labels - 1}] (num_labels={num_labels}) other than the ignore "
        f"index {ignore_index}"
    )
    if torch.compiler.is_compiling() or labels.device.type == "cuda":
        torch._assert_async(in_range.all(), f"{problem}. {fix}")
        return
    try:
        torch._assert_async(in_range.all(), f"{problem}. {fix}")
    except RuntimeError:  # the CPU kernel raises at once
        found = torch.unique(labels[~in_range])
        shown = ", ".join(str(int(value)) for value in found[:5]) + (", ..." if found.numel() > 5 else "")
        raise ValueError(f"{problem}: found {shown}. {fix}") from None


__all__ = [
    "NepaPreTrainedModel",
    "NepaModel",
    "NepaForPreTraining",
    "NepaForImageClassification",
    "NepaModelOutput",
    "NepaForPreTrainingOutput",
    "nepa_loss",
    "soft_target_cross_entropy",
    "check_label_range",
]
