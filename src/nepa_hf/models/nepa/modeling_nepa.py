# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""PyTorch NEPA (Next-Embedding Predictive Autoregression) Vision Transformer.

A plain ViT with a CLS token, no absolute position embedding, 2D RoPE on the patch tokens, QK-norm and
LayerScale. Pretraining predicts the next patch's input embedding (stop-gradient, negative cosine).
Reading order follows transformers' `dinov3_vit`: outputs, embeddings, RoPE, attention, MLP, block, encoder, models.

Copied next to saved checkpoints for `trust_remote_code=True`: imports only torch, transformers and
`configuration_nepa.py`.
"""

import copy
import math
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

from .configuration_nepa import NepaConfig

logger = logging.get_logger(__name__)

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



@dataclass
class NepaModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus `input_embeddings`: [CLS; patch embeddings] as they enter the first block
    (before masking and dropout), i.e. the pretraining targets."""

    input_embeddings: torch.FloatTensor | None = None


@dataclass
class NepaForPreTrainingOutput(ModelOutput):
    """`loss`: the NEPA loss (negative cosine, in [-1, 1]); `last_hidden_state`: the predictions, (batch, 1 +
    num_patches, hidden), position t predicting t + 1; `input_embeddings`: the targets; the rest as `NepaModel`'s."""

    loss: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    input_embeddings: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None



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
            masked = torch.where(
                bool_masked_pos.unsqueeze(-1), self.mask_token.to(patches.dtype).expand_as(patches), patches
            )
            hidden_states = torch.cat([cls, masked], dim=1)
        return self.dropout(hidden_states), input_embeddings



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
        self.is_causal = True  # read by backends only when a call passes no flag; every NEPA forward passes one
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
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.dropout if self.training else 0.0
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
        attn_output = self.o_proj(attn_output.reshape(batch_size, seq_len, -1))
        return self.output_dropout(attn_output), attn_weights



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


def fine_tuning_config(config: NepaConfig) -> NepaConfig:
    """A head's config: where `is_causal` is unset, a copy with False (the paper's bidirectional fine-tuning, which the
    head then saves), leaving the caller's config, maybe a pretraining model's too, alone."""
    if config.is_causal is None:
        config = copy.deepcopy(config)
        config.is_causal = False
    elif config.is_causal and set(config.architectures or ()) & {"NepaModel", "NepaForPreTraining"}:
        logger.warning(
            "This pretraining config sets is_causal=True, so the head fine-tunes causally (the ablation). For the "
            "paper's bidirectional fine-tuning pass is_causal=False, or leave it unset when pretraining."
        )
    return config


def run_trunk(model, pixel_values: torch.Tensor, bool_masked_pos=None, is_causal: bool | None = None, **kwargs):
    """Embeddings, RoPE and blocks (before the final norm) of a model holding them (`NepaModel`, `NepaBackbone`).
    Attention: the call's `is_causal`, else the config's, else causal. Returns (hidden states, input embeddings)."""
    config = model.config
    if pixel_values is None:
        raise ValueError("pixel_values is required: a (batch, channels, height, width) float tensor.")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values has dtype {pixel_values.dtype}: integer pixels are raw 0-255 values, but NEPA takes "
            "normalised floats. Pass the images through the image processor (AutoImageProcessor)."
        )
    if pixel_values.shape[1] != config.num_channels:
        shape = tuple(pixel_values.shape)
        raise ValueError(f"pixel_values of shape {shape}: the model takes (batch, {config.num_channels}, height, width).")
    height, width = pixel_values.shape[-2:]
    if height % config.patch_size or width % config.patch_size:
        raise ValueError(
            f"Image size {height}x{width} is not divisible by the patch size {config.patch_size}: resize or crop to "
            "a multiple of it (the image processor's `size`)."
        )
    is_causal = config.resolved_is_causal if is_causal is None else is_causal
    pixel_values = pixel_values.to(model.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states, input_embeddings = model.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
    position_embeddings = model.rope_embeddings(
        height // config.patch_size, width // config.patch_size, hidden_states.device, hidden_states.dtype
    )
    attention_mask = build_attention_mask(
        config._attn_implementation, is_causal, hidden_states.shape[1], hidden_states.dtype, hidden_states.device
    )
    hidden_states = model.encoder(hidden_states, position_embeddings, attention_mask, is_causal, **kwargs)
    return hidden_states, input_embeddings


class NepaModel(NepaPreTrainedModel):
    """The bare NEPA ViT: embeddings, RoPE, blocks, final LayerNorm; pooled output per `config.pooling`."""

    def __init__(self, config: NepaConfig):
        super().__init__(config)
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
        is_causal: attention of this call; default `config.is_causal` (unset: causal).
        """
        hidden_states, input_embeddings = run_trunk(self, pixel_values, bool_masked_pos, is_causal, **kwargs)
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
    `stop_gradient` (the method) detaches the targets.
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
        config, loss = self.config, None
        if return_loss:
            loss = nepa_loss(outputs.last_hidden_state, outputs.input_embeddings, config.pretraining_shift,
                             config.pretraining_stop_gradient)  # fmt: skip
        return NepaForPreTrainingOutput(
            loss=loss, last_hidden_state=outputs.last_hidden_state, input_embeddings=outputs.input_embeddings,
            pooler_output=outputs.pooler_output, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )  # fmt: skip


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets (Mixup/CutMix/label smoothing), mean over the batch."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


class NepaForImageClassification(NepaPreTrainedModel):
    """NEPA with the reference classification head: pooled features, `fc_norm` (mean pooling only), Linear.

    Attention is bidirectional unless `config.is_causal` is set (see `fine_tuning_config`); a model built from a
    pretraining checkpoint starts from a zero head. Labels: int64 (batch,) class indices (-100 ignored); float
    (batch,) for regression (num_labels 1); float (batch, num_labels) soft targets (soft-target cross-entropy, e.g.
    Mixup/CutMix) unless `problem_type == "multi_label_classification"` (BCE).
    """

    # Trainer: let it average over gradient-accumulation steps (soft targets have no item count).
    accepts_loss_kwargs = False

    def __init__(self, config: NepaConfig):
        config = fine_tuning_config(config)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.nepa = NepaModel(config)
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
        is_causal: attention of this call; default `config.is_causal`.
        """
        kwargs.pop("num_items_in_batch", None)
        outputs = self.nepa(pixel_values, is_causal=is_causal, **kwargs)
        logits = self.classifier(self.fc_norm(outputs.pooler_output))

        loss = None
        if labels is not None:
            labels = labels.to(logits.device)
            soft_targets = (
                labels.is_floating_point()
                and labels.shape == logits.shape
                and self.num_labels > 1
                and self.config.problem_type != "multi_label_classification"
            )
            if soft_targets:
                loss = soft_target_cross_entropy(logits, labels)
            else:
                loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "NepaPreTrainedModel",
    "NepaModel",
    "NepaForPreTraining",
    "NepaForImageClassification",
    "NepaModelOutput",
    "NepaForPreTrainingOutput",
    "nepa_loss",
    "soft_target_cross_entropy",
]
