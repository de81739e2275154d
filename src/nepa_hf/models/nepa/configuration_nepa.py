# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""NEPA model configuration.

This file is copied next to saved checkpoints so that `trust_remote_code=True` users need nothing but
transformers: it imports only transformers and the standard library.
"""

import dataclasses
import difflib
import typing

from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# Names of the reference (`vit_nepa`) config fields that we renamed, ours -> theirs.
REFERENCE_FIELD_RENAMES = {"drop_path_rate": "drop_path_prob"}

# One-call presets. "b"/"l" are the authors' released sizes (patch 14 at 224); the pretraining presets are
# causal with the exact QK-norm flavour of the released weights. The small sizes are for CPUs.
NEPA_PRESETS: dict[str, dict] = {
    "nepa-vit-b": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        patch_size=14, image_size=224, is_causal=True, qk_norm_affine=False, drop_path_rate=0.0,
    ),
    "nepa-vit-b-in1k": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        patch_size=14, image_size=224, is_causal=False, qk_norm_affine=True, drop_path_rate=0.1,
    ),
    "nepa-vit-l": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        patch_size=14, image_size=224, is_causal=True, qk_norm_affine=True, drop_path_rate=0.0,
    ),
    "nepa-vit-l-in1k": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        patch_size=14, image_size=224, is_causal=False, qk_norm_affine=True, drop_path_rate=0.2,
    ),
    "nepa-vit-small": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        patch_size=14, image_size=224, is_causal=True, qk_norm_affine=True,
    ),
    "nepa-vit-tiny": dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
        patch_size=14, image_size=224, is_causal=True, qk_norm_affine=True,
    ),
    # Small enough to pretrain on 28x28 Fashion-MNIST (padded/resized to 32) on two CPU cores.
    "nepa-vit-micro": dict(
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
        patch_size=4, image_size=32, is_causal=True, qk_norm_affine=True,
    ),
}


def default_backbone_out_indices(num_hidden_layers: int) -> list[int]:
    """The four stages `NepaForSemanticSegmentation` reads unless its config names four: after blocks L/3, L/2, 2L/3
    and L (1-based; stage 0 is the embeddings).

    This is the plain-ViT dense-prediction convention (BEiT/MAE UperNet: blocks 3, 5, 7, 11 of 12, zero-based,
    are stages 4, 6, 8, 12; 7, 11, 15, 23 of 24). Nearby indices are spread so all four differ; with fewer than 4
    blocks the embedding output ("stem") and every block are used.
    """
    if num_hidden_layers < 4:
        return list(range(max(0, num_hidden_layers - 3), num_hidden_layers + 1))
    stages: list[int] = []
    for sixths in (2, 3, 4, 6):
        stages.append(max(num_hidden_layers * sixths // 6, stages[-1] + 1 if stages else 1))
    return stages


# Models whose attention is `finetuning_is_causal` (the others, NepaModel and NepaForPreTraining, use `is_causal`).
FINETUNING_ARCHITECTURES = ("NepaForImageClassification", "NepaForSemanticSegmentation", "NepaBackbone")

def saved_by_finetuning_model(config) -> bool:
    """Whether `config.architectures` names a fine-tuning model, i.e. the config was saved by one."""
    return any(name in FINETUNING_ARCHITECTURES for name in (getattr(config, "architectures", None) or []))


class NepaConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a NEPA Vision Transformer (arXiv 2512.16922).

    Field names follow the authors' `vit_nepa` config, except `drop_path_rate` (theirs: `drop_path_prob`) and
    `pooling` (theirs: `add_pooling_layer`; `True` is `"mean"`, `False` is `"last"`).

    Args:
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: transformer sizes.
        hidden_act: MLP activation (`"gelu"` is the exact erf GELU of the released weights).
        use_gated_mlp: `down(act(gate(x)) * up(x))` instead of `down(act(up(x)))` (SwiGLU with `"silu"`).
        hidden_dropout_prob: dropout on the embeddings and after each branch's output projection.
        attention_probs_dropout_prob: dropout on attention probabilities.
        initializer_range: std of the truncated-normal init of Linear/Conv weights and the CLS token.
        layer_norm_eps: eps of every LayerNorm (blocks, final, QK-norm, fc_norm).
        rope_theta: base of the 2D RoPE frequencies.
        image_size, patch_size, num_channels: input geometry. Any input divisible by the patch size works.
        qkv_bias: bias on the q, k, v projections.
        qk_norm, qk_norm_affine, qk_norm_bias: LayerNorm over the head dim on q and k, with/without weight/bias.
        layerscale_value: init of both LayerScale vectors; `None` builds blocks without LayerScale.
        drop_path_rate: stochastic depth at the last block (linear from 0 at the first block).
        pooling: `"mean"` (mean of patch tokens, then `fc_norm`) or `"last"` (last token, no `fc_norm`).
        is_causal: attention of the pretraining models, `NepaModel` and `NepaForPreTraining`: causal (True, the
            method) or bidirectional. A call's `is_causal=` overrides it.
        finetuning_is_causal: attention of the fine-tuning models, `NepaForImageClassification`,
            `NepaForSemanticSegmentation` and `NepaBackbone` (and of the `NepaModel` inside a head): bidirectional
            (False, the paper's fine-tuning) unless set; True is the causal fine-tuning ablation. A call's
            `is_causal=` overrides it. This is the one rule every head follows, so a pretraining checkpoint
            (`is_causal=True`) loads into any head as a bidirectional model and keeps its own attention as a
            `NepaModel`; no constructor changes the config. Left unset in a config saved by a fine-tuning head
            before this field existed, it is that config's `is_causal` (what the head computed then).
        pos_embed_shift, pos_embed_jitter, pos_embed_rescale: training-time RoPE coordinate augmentation.
        use_mask_token: build a learned mask token so `bool_masked_pos` can replace input patches.
        pretraining_shift: next-position targets (True, the method) or same-position targets (ablation).
        pretraining_stop_gradient: detach the targets (True, the method); False is the collapse ablation.
        apply_layernorm, reshape_hidden_states, out_features, out_indices: backbone options (`NepaBackbone`).
            `out_indices` count blocks from 1 (0 is the embedding output, "stem"); unset, the backbone outputs the
            last block, as every transformers backbone does. `NepaForSemanticSegmentation` reads four stages: unless
            four are set it takes `default_backbone_out_indices(num_hidden_layers)` (4, 6, 8, 12 of 12 blocks).
        decode_hidden_size: channels of the UperNet decode head of `NepaForSemanticSegmentation`; unset, the
            backbone's `hidden_size` (as BEiT's UperNet head in transformers: 768 for ViT-B).
        pool_scales: output sizes of the decode head's pyramid pooling module.
        use_auxiliary_head, auxiliary_hidden_size, auxiliary_loss_weight: the FCN auxiliary head on the third
            pyramid level, used only for the training loss (`loss = decode + weight * auxiliary`); unset,
            `auxiliary_hidden_size` is `hidden_size // 3` (BEiT's 256 for ViT-B). Both heads so scale with the backbone.
        semantic_loss_ignore_index: label value that the segmentation loss ignores (255, the ADE20K convention
            that `do_reduce_labels` produces).
    """

    model_type = "nepa"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    use_gated_mlp: bool = False
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float | int = 0.02
    layer_norm_eps: float | int = 1e-12
    rope_theta: float | int = 100.0
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    qk_norm: bool = True
    qk_norm_affine: bool = False
    qk_norm_bias: bool = False
    layerscale_value: float | int | None = 1e-5
    drop_path_rate: float | int = 0.0
    pooling: str = "mean"
    is_causal: bool = True
    finetuning_is_causal: bool | None = None
    pos_embed_shift: float | int | None = None
    pos_embed_jitter: float | int | None = None
    pos_embed_rescale: float | int | None = 2.0
    use_mask_token: bool = False
    pretraining_shift: bool = True
    pretraining_stop_gradient: bool = True
    apply_layernorm: bool = True
    reshape_hidden_states: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None
    decode_hidden_size: int | None = None
    pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6)
    use_auxiliary_head: bool = True
    auxiliary_hidden_size: int | None = None
    auxiliary_loss_weight: float | int = 0.4
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        # Accept the reference spellings so a `vit_nepa` config dict can be passed straight in.
        if "drop_path_prob" in kwargs:
            self.drop_path_rate = kwargs.pop("drop_path_prob")
        if "add_pooling_layer" in kwargs:
            self.pooling = "mean" if kwargs.pop("add_pooling_layer") else "last"
        if self.decode_hidden_size is None:
            self.decode_hidden_size = self.hidden_size
        if self.auxiliary_hidden_size is None:
            self.auxiliary_hidden_size = max(self.hidden_size // 3, 1)
        if self.finetuning_is_causal is None:
            self.finetuning_is_causal = self.is_causal if saved_by_finetuning_model(self) else False
        self._validate_nepa()
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def _validate_nepa(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 4 != 0:
            raise ValueError(
                f"The head dim hidden_size/num_attention_heads = {head_dim} must be divisible by 4: 2D RoPE uses "
                "head_dim/4 frequencies per axis. Change hidden_size or num_attention_heads."
            )
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}.")
        if not self.pool_scales or any(int(scale) < 1 for scale in self.pool_scales):
            raise ValueError(f"pool_scales must be a non-empty list of positive sizes, got {self.pool_scales!r}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def update_from_string(self, update_str: str):
        """`PreTrainedConfig.update_from_string`: "field=value,field=value", each value typed like the field's current
        one (booleans: true/false). NEPA adds what transformers cannot type: integer lists written `a:b:c`
        (`pool_scales=1:2:3:6`, `out_indices=2:4`) and numbers for unset fields (`pos_embed_shift=0.1`). A bad item
        raises a ValueError that names it.

        This changes one field at a time and skips what the constructor derives and checks (the backbone stages
        follow `num_hidden_layers`); `overrides_from_string` gives the same values as constructor arguments.
        """
        annotations = {f.name: f.type for f in dataclasses.fields(self) if not f.name.startswith("_")}
        fields = set(annotations) | {"out_indices"}  # the backbone stages are properties over `_out_indices`
        for item in filter(None, (part.strip() for part in update_str.split(","))):
            key, sep, value = (part.strip() for part in item.partition("="))
            if not sep:
                raise ValueError(f"Config override {item!r} is not of the form field=value.")
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                nepa_fields = fields - {f.name for f in dataclasses.fields(PreTrainedConfig)}
                hint = f"Did you mean {close[0]!r}?" if close else f"NEPA's fields: {', '.join(sorted(nepa_fields))}."
                raise ValueError(f"Config override {item!r}: {key!r} is not a field of {type(self).__name__}. {hint}")
            current = getattr(self, key)
            try:
                if isinstance(current, (list, tuple)):
                    setattr(self, key, [int(entry) for entry in value.split(":")])
                elif current is None:  # unset: typed by the field's annotation, e.g. `float | int | None`
                    setattr(self, key, float(value) if float in typing.get_args(annotations[key]) else value)
                else:
                    super().update_from_string(f"{key}={value}")
            except (TypeError, ValueError) as error:
                raise ValueError(f"Config override {item!r}: {error}") from error

    @classmethod
    def overrides_from_string(cls, update_str: str | None) -> dict:
        """`update_from_string`'s values as keyword arguments for `NepaConfig(...)`, `from_preset` or
        `from_pretrained`: "hidden_size=64,pool_scales=1:2" -> {"hidden_size": 64, "pool_scales": [1, 2]}; None or
        "" -> {}. The constructor then checks them and derives what depends on them (the default backbone stages
        follow `num_hidden_layers`), which setting them on a built config would not."""
        if not update_str:
            return {}
        items = [item.strip() for item in update_str.split(",") if item.strip()]
        # The backbone stages are checked against the layer count, which only the constructor knows for sure (it
        # may come from a preset, a checkpoint or this same string): take their indices as given, check them there.
        stages = [item for item in items if item.partition("=")[0].strip() == "out_indices"]
        rest = [item for item in items if item not in stages]
        parsed = cls()
        parsed.update_from_string(",".join(rest))
        overrides = {item.partition("=")[0].strip(): None for item in rest}
        overrides = {key: getattr(parsed, key) for key in overrides}
        for item in stages:
            try:
                overrides["out_indices"] = [int(entry) for entry in item.partition("=")[2].split(":")]
            except ValueError as error:
                raise ValueError(f"Config override {item!r}: {error}") from error
        return overrides

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NepaConfig":
        """Build a config from a preset name (`nepa-vit-b`, `nepa-vit-l`, `nepa-vit-small`, `nepa-vit-tiny`, ...).

        Keyword arguments override preset fields, e.g. `NepaConfig.from_preset("nepa-vit-tiny", image_size=112)`.
        """
        if name not in NEPA_PRESETS:
            raise ValueError(f"Unknown NEPA preset {name!r}. Available presets: {sorted(NEPA_PRESETS)}.")
        return cls(**{**NEPA_PRESETS[name], **overrides})


__all__ = [
    "NepaConfig",
    "NEPA_PRESETS",
    "FINETUNING_ARCHITECTURES",
    "default_backbone_out_indices",
    "saved_by_finetuning_model",
]
