# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""nepa-hf: NEPA (Next-Embedding Predictive Autoregression, arXiv 2512.16922) for Hugging Face transformers.

Importing the package registers `model_type="nepa"` with the transformers Auto classes.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

from .models.nepa.configuration_nepa import NEPA_PRESETS, NepaConfig, default_backbone_out_indices
from .models.nepa.image_processing_nepa import NepaImageProcessor, NepaImageProcessorPil
from .models.nepa.modeling_nepa import (
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForPreTrainingOutput,
    NepaModel,
    NepaModelOutput,
    NepaPreTrainedModel,
    nepa_loss,
    soft_target_cross_entropy,
)
from .models.nepa.modeling_nepa_segmentation import NepaBackbone, NepaForSemanticSegmentation

__version__ = "0.1.0"

AutoConfig.register(NepaConfig.model_type, NepaConfig, exist_ok=True)
AutoModel.register(NepaConfig, NepaModel, exist_ok=True)
AutoModelForPreTraining.register(NepaConfig, NepaForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(NepaConfig, NepaForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(NepaConfig, NepaForSemanticSegmentation, exist_ok=True)
AutoBackbone.register(NepaConfig, NepaBackbone, exist_ok=True)
AutoImageProcessor.register(
    NepaConfig,
    image_processor_classes={"pil": NepaImageProcessorPil, "torchvision": NepaImageProcessor},
    exist_ok=True,
)
# NEPA has no video processor. Saying so keeps pipelines from guessing a remote one from the image processor's
# auto_map and prompting "Do you wish to run the custom code?" (transformers 5.2x pipeline behaviour).
# (AutoVideoProcessor itself needs torchvision, so register on its mapping directly.)
try:
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING

    VIDEO_PROCESSOR_MAPPING.register(NepaConfig, {}, exist_ok=True)
except (ImportError, AttributeError):  # pragma: no cover - older transformers without video processors
    pass

# Saved checkpoints carry these code files and an auto_map, so `trust_remote_code=True` users need no install.
NepaConfig.register_for_auto_class()
NepaModel.register_for_auto_class("AutoModel")
NepaForPreTraining.register_for_auto_class("AutoModelForPreTraining")
NepaForImageClassification.register_for_auto_class("AutoModelForImageClassification")
# Either image processor saves an auto_map naming both backends (their `to_dict`), so remote code picks the backend.
NepaImageProcessorPil.register_for_auto_class("AutoImageProcessor")
if NepaImageProcessor is not None:  # None without torchvision
    NepaImageProcessor.register_for_auto_class("AutoImageProcessor")
NepaForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
NepaBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "NEPA_PRESETS",
    "NepaConfig",
    "NepaImageProcessor",
    "NepaImageProcessorPil",
    "NepaModel",
    "NepaModelOutput",
    "NepaPreTrainedModel",
    "NepaForPreTraining",
    "NepaForPreTrainingOutput",
    "NepaForImageClassification",
    "nepa_loss",
    "soft_target_cross_entropy",
    "NepaBackbone",
    "NepaForSemanticSegmentation",
    "default_backbone_out_indices",
]
