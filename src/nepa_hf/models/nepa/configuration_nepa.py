# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""NEPA model configuration. Copied next to saved checkpoints for `trust_remote_code=True`: imports only transformers
and huggingface_hub."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

# One-call presets. "b"/"l" are the authors' released sizes (patch 14 at 224): the pretraining presets leave
# `is_causal` unset (causal pretraining, bidirectional heads) with the QK-norm flavour of the released weights; the
# "-in1k" ones are the fine-tuned classifiers. The small sizes are for CPUs.
NEPA_PRESETS: dict[str, dict] = {
    "nepa-vit-b": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        patch_size=14, image_size=224, qk_norm_affine=False, drop_path_rate=0.0,
    ),
    "nepa-vit-b-in1k": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        patch_size=14, image_size=224, is_causal=False, qk_norm_affine=True, drop_path_rate=0.1,
    ),
    "nepa-vit-l": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        patch_size=14, image_size=224, qk_norm_affine=True, drop_path_rate=0.0,
    ),
    "nepa-vit-l-in1k": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        patch_size=14, image_size=224, is_causal=False, qk_norm_affine=True, drop_path_rate=0.2,
    ),
    "nepa-vit-small": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        patch_size=14, image_size=224, qk_norm_affine=True,
    ),
    "nepa-vit-tiny": dict(
        hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
        patch_size=14, image_size=224, qk_norm_affine=True,
    ),
    # Small enough to pretrain on 28x28 Fashion-MNIST (padded/resized to 32) on two CPU cores.
    "nepa-vit-micro": dict(
        hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512,
        patch_size=4, image_size=32, qk_norm_affine=True,
    ),
}


def default_backbone_out_indices(num_hidden_layers: int) -> list[int]:
    """The four stages `NepaForSemanticSegmentation` reads unless its config names four: after blocks L/3, L/2, 2L/3
    and L (stage 0 is the embeddings), the plain-ViT convention of BEiT/MAE UperNet (4, 6, 8, 12 of 12). Nearby
    indices are spread so all four differ; with fewer than 4 blocks the embeddings and every block are used."""
    if num_hidden_layers < 4:
        return list(range(max(0, num_hidden_layers - 3), num_hidden_layers + 1))
    stages: list[int] = []
    for sixths in (2, 3, 4, 6):
        stages.append(max(num_hidden_layers * sixths // 6, stages[-1] + 1 if stages else 1))
    return stages


@strict
class NepaConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""Configuration of a NEPA Vision Transformer (arXiv 2512.16922).

    Field names follow the authors' `vit_nepa` config, except `drop_path_rate` (theirs: `drop_path_prob`) and
    `pooling` (theirs: `add_pooling_layer`); their checkpoints go through `convert_nepa.py`.

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
        is_causal: the attention, followed by every model class when set. Unset (None), `NepaModel` and
            `NepaForPreTraining` attend causally (the method), and a head (`NepaForImageClassification`,
            `NepaForSemanticSegmentation`, `NepaBackbone`) sets it to False, the paper's bidirectional fine-tuning,
            so a pretraining checkpoint loads into a head bidirectionally and the head saves what it computed. True
            on a head is the causal fine-tuning ablation. A call's `is_causal=` overrides it.
        pos_embed_shift, pos_embed_jitter, pos_embed_rescale: training-time RoPE coordinate augmentation.
        use_mask_token: build a learned mask token so `bool_masked_pos` can replace input patches.
        pretraining_shift: next-position targets (True, the method) or same-position targets (ablation).
        pretraining_stop_gradient: detach the targets (True, the method); False is the collapse ablation.
        apply_layernorm, reshape_hidden_states, out_features, out_indices: backbone options (`NepaBackbone`);
            stage i is block i, "stem" the embeddings. Unset, the backbone outputs the last block; the segmenter
            takes `default_backbone_out_indices` unless four are set.
        decode_hidden_size: channels of the UperNet decode head; unset, `hidden_size` (BEiT's UperNet: 768 for ViT-B).
        pool_scales: output sizes of the decode head's pyramid pooling module.
        use_auxiliary_head, auxiliary_hidden_size, auxiliary_loss_weight: the FCN auxiliary head, used only for the
            training loss (`decode + weight * auxiliary`); unset, `auxiliary_hidden_size` is `hidden_size // 3`.
        semantic_loss_ignore_index: label value the segmentation loss ignores (255, what `do_reduce_labels` writes).
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
    is_causal: bool | None = None
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
        if {"drop_path_prob", "add_pooling_layer"} & set(kwargs):  # would be kept as unused attributes
            raise ValueError(
                "drop_path_prob / add_pooling_layer are the authors' `vit_nepa` field names: convert their checkpoint "
                "with `python -m nepa_hf.hub.convert`, or pass drop_path_rate= / pooling='mean'|'last'."
            )
        if self.decode_hidden_size is None:
            self.decode_hidden_size = self.hidden_size
        if self.auxiliary_hidden_size is None:
            self.auxiliary_hidden_size = max(self.hidden_size // 3, 1)
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Part of `@strict` validation (construction and save)."""
        super().validate_architecture()
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) into heads of a size divisible by 4 (2D RoPE: head_dim/4 frequencies "
                "per axis)."
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size}).")
        if self.pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {self.pooling!r}.")
        if not self.pool_scales or min(self.pool_scales) < 1:
            raise ValueError(f"pool_scales must be a non-empty list of positive sizes, got {self.pool_scales!r}.")

    @property
    def resolved_is_causal(self) -> bool:
        """The attention the models compute with this config: `is_causal`, unset meaning causal (heads set it)."""
        return True if self.is_causal is None else self.is_causal

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NepaConfig":
        """A preset's config (`NEPA_PRESETS`), keyword arguments overriding its fields, e.g.
        `NepaConfig.from_preset("nepa-vit-tiny", image_size=112)`."""
        if name not in NEPA_PRESETS:
            raise ValueError(f"Unknown NEPA preset {name!r}. Available presets: {sorted(NEPA_PRESETS)}.")
        return cls(**{**NEPA_PRESETS[name], **overrides})


__all__ = ["NepaConfig", "NEPA_PRESETS", "default_backbone_out_indices"]
