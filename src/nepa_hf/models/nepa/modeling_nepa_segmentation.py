# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""NEPA for dense prediction.

`NepaBackbone` turns a NEPA ViT into a transformers backbone: feature maps (B, D, H/p, W/p) after selected blocks,
usable by any backbone-based head (e.g. transformers' `UperNetForSemanticSegmentation`).
`NepaForSemanticSegmentation` is the plain-ViT recipe of the paper's ADE20K transfer: four evenly spaced blocks,
a multi-scale neck (4x up, 2x up, identity, 2x down), then transformers' own UperNet decode head (pyramid pooling +
FPN) and FCN auxiliary head (for the training loss).

Copied next to saved checkpoints for `trust_remote_code=True`: imports only torch, transformers and its siblings.
"""

import copy
from types import SimpleNamespace

import torch
from torch import nn
from transformers import BackboneMixin
from transformers.modeling_outputs import BackboneOutput, BaseModelOutput, SemanticSegmenterOutput
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs

from .configuration_nepa import NepaConfig, default_backbone_out_indices
from .modeling_nepa import (
    NepaEmbeddings,
    NepaEncoder,
    NepaPatchEmbeddings,
    NepaPreTrainedModel,
    NepaRopePositionEmbedding,
    can_return_tuple,
    capture_outputs,
    fine_tuning_config,
    run_trunk,
)

try:
    from transformers.backbone_utils import filter_output_hidden_states
except ImportError:  # pragma: no cover - older 5.x
    from transformers.utils.backbone_utils import filter_output_hidden_states

# Head weights of other NEPA checkpoints that a backbone does not use (loaded from a classifier/segmenter).
_HEAD_KEYS = [r"(^|\.)fc_norm\.", r"(^|\.)classifier\.", r"(^|\.)neck\.", r"(^|\.)decode_head\.", r"(^|\.)auxiliary_head\."]


def _register_for_image_segmentation_pipeline() -> None:
    """`pipeline("image-segmentation")` checks the class name against copies of transformers' segmentation name
    dicts, which miss what `AutoModelForSemanticSegmentation.register` adds (transformers 5.x) and would log an error:
    add the name there, on import, so remote-code users get it too. Loading still goes through the registered class.
    """
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES
    except ImportError:  # pragma: no cover - a transformers without this mapping has no such check either
        return
    MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(NepaConfig.model_type, "NepaForSemanticSegmentation")


_register_for_image_segmentation_pipeline()



class NepaBackbone(BackboneMixin, NepaPreTrainedModel):
    """NEPA ViT as a transformers backbone.

    Same submodules as `NepaModel` (`embeddings`, `rope_embeddings`, `encoder`, `norm`), so weights load from any
    NEPA checkpoint: pretrained, fine-tuned, converted (`NepaBackbone.from_pretrained(dir, out_indices=[...])`).
    For each stage in `config.out_features` (stage i = output of block i, "stem" = embeddings) it returns the patch
    tokens (CLS dropped), after the final LayerNorm when `config.apply_layernorm`, as (B, D, H/p, W/p) maps when
    `config.reshape_hidden_states` (else (B, N, D)). Attention is bidirectional unless `config.is_causal` is set, as
    for every head (`fine_tuning_config`); `is_causal=` per call overrides it.
    """

    _keys_to_ignore_on_load_unexpected = _HEAD_KEYS

    def __init__(self, config: NepaConfig):
        config = fine_tuning_config(config)
        super().__init__(config)
        self.embeddings = NepaEmbeddings(config)
        self.rope_embeddings = NepaRopePositionEmbedding(config)
        self.encoder = NepaEncoder(config)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.post_init()

    def get_input_embeddings(self) -> NepaPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def _encode(self, pixel_values: torch.Tensor, is_causal: bool | None = None, **kwargs) -> BaseModelOutput:
        """The NepaModel trunk without pooling; `capture_outputs` collects per-block hidden states / attentions."""
        hidden_states, _ = run_trunk(self, pixel_values, is_causal=is_causal, **kwargs)
        return BaseModelOutput(last_hidden_state=hidden_states)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        is_causal: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        pixel_values: (batch, channels, height, width); height and width multiples of the patch size.
        is_causal: attention of this call; default `config.is_causal`.

        Returns `BackboneOutput.feature_maps`: one tensor per `config.out_features` stage.
        """
        kwargs["output_hidden_states"] = True  # the feature maps are read from the per-block hidden states
        outputs = self._encode(pixel_values, is_causal=is_causal, **kwargs)
        batch_size = pixel_values.shape[0]
        grid_h, grid_w = pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size

        feature_maps = []
        for stage_name, hidden_state in zip(self.stage_names, outputs.hidden_states):
            if stage_name not in self.out_features:
                continue
            if self.config.apply_layernorm:
                hidden_state = self.norm(hidden_state)
            patch_tokens = hidden_state[:, 1:]  # drop CLS
            if self.config.reshape_hidden_states:
                patch_tokens = patch_tokens.reshape(batch_size, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
            feature_maps.append(patch_tokens)
        return BackboneOutput(
            feature_maps=tuple(feature_maps), hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )



class NepaMultiScaleNeck(nn.Module):
    """Four same-resolution ViT maps (stride p) -> a pyramid with strides p/4, p/2, p, 2p.

    The plain-ViT neck of BEiT/MAE UperNet: two stride-2 transposed convs (with BatchNorm + GELU between) for 4x up,
    one for 2x up, identity, and 2x2 max pooling for 2x down (odd grids are floored).
    """

    def __init__(self, config: NepaConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.upsample_4x = nn.Sequential(
            nn.ConvTranspose2d(hidden_size, hidden_size, kernel_size=2, stride=2),
            nn.BatchNorm2d(hidden_size),
            nn.GELU(),
            nn.ConvTranspose2d(hidden_size, hidden_size, kernel_size=2, stride=2),
        )
        self.upsample_2x = nn.ConvTranspose2d(hidden_size, hidden_size, kernel_size=2, stride=2)
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        operations = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [operation(feature_map) for operation, feature_map in zip(operations, feature_maps)]


def upernet_head_config(config: NepaConfig) -> SimpleNamespace:
    """The fields that transformers' `UperNetHead` / `UperNetFCNHead` read, under `UperNetConfig`'s names, taken
    from a NEPA config (whose `hidden_size` is the ViT width, so the decode width is `decode_hidden_size`). The
    heads read it once, in their constructors."""
    return SimpleNamespace(
        num_labels=config.num_labels,
        pool_scales=tuple(int(scale) for scale in config.pool_scales),
        hidden_size=config.decode_hidden_size,
        auxiliary_in_channels=None,  # the channels of the pyramid level the FCN head reads
        auxiliary_channels=config.auxiliary_hidden_size,
        auxiliary_num_convs=1,
        auxiliary_concat_input=False,
    )



class NepaForSemanticSegmentation(NepaPreTrainedModel):
    """NEPA ViT + multi-scale neck + transformers' UperNet decode head (+ its FCN auxiliary head for the loss).

    Built from any NEPA checkpoint (`NepaForSemanticSegmentation.from_pretrained(dir, id2label=..., label2id=...)`):
    the backbone weights load into `nepa`, the neck and heads start from scratch. Attention is bidirectional unless
    `config.is_causal` is set, as for every head.
    The backbone feeds four stages: `config.out_indices` when it names four, else four evenly spaced blocks
    (`default_backbone_out_indices`), which the model writes into its config.

    `logits` are (batch, num_labels, 4 * H/p, 4 * W/p), i.e. at stride p/4; the loss and
    `post_process_semantic_segmentation` upsample them bilinearly. `labels` are (batch, H, W) int64 class indices;
    `config.semantic_loss_ignore_index` (255) marks pixels without a label.
    """

    # The Trainer counts every label != -100 as an item, including 255 "ignore" pixels: let the loss take its mean.
    accepts_loss_kwargs = False
    _keys_to_ignore_on_load_unexpected = [r"^fc_norm\.", r"^classifier\."]

    def __init__(self, config: NepaConfig):
        config = fine_tuning_config(copy.deepcopy(config))  # its own copy: the stages are written into it
        four_stages = default_backbone_out_indices(config.num_hidden_layers)
        if len(four_stages) != 4:
            raise ValueError(
                f"NepaForSemanticSegmentation needs four feature maps, but a {config.num_hidden_layers}-block NEPA "
                "has fewer than four stages. Use num_hidden_layers >= 3."
            )
        if config.out_indices == [config.num_hidden_layers]:  # the backbone default (last block): no stages chosen
            config.set_output_features_output_indices(out_indices=four_stages, out_features=None)
        elif len(config.out_indices) != 4:
            raise ValueError(
                f"NepaForSemanticSegmentation reads four backbone stages, but config.out_indices={config.out_indices} "
                f"selects {len(config.out_indices)}. Set out_indices={four_stages} (four evenly spaced blocks), e.g. "
                f"NepaForSemanticSegmentation.from_pretrained(..., out_indices={four_stages})."
            )
        super().__init__(config)
        self.nepa = NepaBackbone(config)
        in_channels = self.nepa.channels
        self.neck = NepaMultiScaleNeck(config)
        head_config = upernet_head_config(config)
        self.decode_head = UperNetHead(head_config, in_channels)
        self.auxiliary_head = UperNetFCNHead(head_config, in_channels) if config.use_auxiliary_head else None
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
    ) -> SemanticSegmenterOutput:
        r"""
        labels: (batch, height, width) int64 class indices; `config.semantic_loss_ignore_index` is ignored.
        is_causal: attention of this call; default `config.is_causal`.
        """
        kwargs.pop("num_items_in_batch", None)  # see accepts_loss_kwargs
        if self.training and pixel_values is not None and pixel_values.shape[0] < 2:
            raise ValueError(
                "Training NepaForSemanticSegmentation needs at least 2 images per batch: the BatchNorm layers of the "
                "neck and decode head cannot normalise the 1x1 pyramid-pooling level of a single image. Increase the "
                "(per-device) batch size, or call model.eval() for inference."
            )

        outputs = self.nepa(pixel_values, is_causal=is_causal, **kwargs)
        pyramid = self.neck(outputs.feature_maps)
        logits = self.decode_head(pyramid)

        loss = None
        if labels is not None:
            auxiliary_logits = self.auxiliary_head(pyramid) if self.auxiliary_head is not None else None
            loss = self.loss_function(
                logits,
                labels,
                ignore_index=self.config.semantic_loss_ignore_index,
                auxiliary_logits=auxiliary_logits,
                auxiliary_loss_weight=self.config.auxiliary_loss_weight,
            )
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = ["NepaBackbone", "NepaForSemanticSegmentation"]
