"""NEPA: configuration, models, image processors and checkpoint conversion.

This folder is the self-contained bundle that `save_pretrained` copies beside checkpoints for
`trust_remote_code=True`: its files import only torch, transformers, numpy, PIL and the standard library.
"""

from .configuration_nepa import NEPA_PRESETS, NepaConfig, default_backbone_out_indices
from .image_processing_nepa import NepaImageProcessor, NepaImageProcessorPil
from .modeling_nepa import (
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForPreTrainingOutput,
    NepaModel,
    NepaModelOutput,
    NepaPreTrainedModel,
    nepa_loss,
    soft_target_cross_entropy,
)
from .modeling_nepa_segmentation import NepaBackbone, NepaForSemanticSegmentation
