"""transformers' own common tests on the NEPA family: `ModelTesterMixin` on the four models, `ConfigTester` on
`NepaConfig`, `BackboneTesterMixin` on `NepaBackbone` (the image processors: test_transformers_common_processors.py).

The mixins come from the source distribution of the installed transformers (see transformers_common.py). Each skip
below says why the test does not apply; everything else runs as it does for ViT and DINOv3.
"""

import contextlib
import unittest
from unittest import mock

import pytest
import torch
from transformers.models.auto import modeling_auto

from nepa_hf import (
    NepaBackbone,
    NepaConfig,
    NepaForImageClassification,
    NepaForPreTraining,
    NepaForSemanticSegmentation,
    NepaModel,
)
from nepa_hf.models.nepa.modeling_nepa import NepaPatchEmbeddings
from transformers_common import load

modeling_common = load("test_modeling_common")
configuration_common = load("test_configuration_common")
backbone_common = load("test_backbone_common")

pytestmark = pytest.mark.slow

# transformers decides per architecture name which labels and inputs a test builds (`_prepare_for_class`) and which
# models are bare encoders (no training test) from the name tables of its Auto classes. NEPA registers its classes
# with the Auto classes, which keeps them out of those tables; the tests see them as transformers would see the family
# if it were in the library.
NEPA_AUTO_NAMES = {
    "MODEL_MAPPING_NAMES": "NepaModel",
    "MODEL_FOR_PRETRAINING_MAPPING_NAMES": "NepaForPreTraining",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES": "NepaForImageClassification",
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES": "NepaForSemanticSegmentation",
    "MODEL_FOR_BACKBONE_MAPPING_NAMES": "NepaBackbone",
}


@pytest.fixture(scope="module")
def nepa_auto_names():
    with contextlib.ExitStack() as stack:
        for table, name in NEPA_AUTO_NAMES.items():
            stack.enter_context(mock.patch.dict(getattr(modeling_auto, table), {"nepa": name}))
        yield


class NepaModelTester:
    """A small NEPA on 16x16 images with 4x4 patches (16 patch tokens + CLS), with a mask token."""

    def __init__(self, parent, batch_size=4, image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, num_labels=3):  # fmt: skip
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_labels = num_labels
        self.seq_length = (image_size // patch_size) ** 2 + 1
        self.mask_length = (image_size // patch_size) ** 2  # bool_masked_pos covers the patches, not CLS
        self.num_masks = self.mask_length // 2
        self.is_training = True

    def get_config(self, **overrides) -> NepaConfig:
        return NepaConfig(**{
            "image_size": self.image_size, "patch_size": self.patch_size, "num_channels": self.num_channels,
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "intermediate_size": self.intermediate_size,
            "num_labels": self.num_labels, "use_mask_token": True, "decode_hidden_size": 16, "auxiliary_hidden_size": 8, "pool_scales": [1, 2],
            **overrides,
        })  # fmt: skip

    def prepare_config_and_inputs(self):
        pixel_values = modeling_common.floats_tensor(
            [self.batch_size, self.num_channels, self.image_size, self.image_size]
        )
        labels = modeling_common.ids_tensor([self.batch_size], self.num_labels)
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


@pytest.mark.usefixtures("nepa_auto_names")
class NepaModelTest(modeling_common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (NepaModel, NepaForPreTraining, NepaForImageClassification)
    test_resize_embeddings = False  # no token embeddings: patch embeddings come from a Conv2d
    # The tester builds the mask token, so that the attention tests can pass `bool_masked_pos`; it gets a gradient
    # only from masked inputs, which the gradient-checkpointing training tests do not give.
    test_all_params_have_gradient = False

    def setUp(self):
        self.model_tester = NepaModelTester(self)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=NepaConfig, has_text_modality=False, hidden_size=40, num_attention_heads=2
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_shapes(self):
        config, pixel_values, labels = self.model_tester.prepare_config_and_inputs()
        tester = self.model_tester
        model = NepaModel(config).eval()
        with torch.no_grad():
            output = model(pixel_values)
        self.assertEqual(output.last_hidden_state.shape, (tester.batch_size, tester.seq_length, tester.hidden_size))
        self.assertEqual(output.pooler_output.shape, (tester.batch_size, tester.hidden_size))
        classifier = NepaForImageClassification(config).eval()
        with torch.no_grad():
            output = classifier(pixel_values, labels=labels)
        self.assertEqual(output.logits.shape, (tester.batch_size, tester.num_labels))
        self.assertTrue(torch.isfinite(output.loss))

    def test_model_get_set_embeddings(self):
        # transformers' vision tests (ViT, DINOv3) replace the text version, which wants an nn.Embedding.
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), NepaPatchEmbeddings)
            self.assertIsNone(model.get_output_embeddings())

    @unittest.skip(reason="NEPA takes pixel_values only: there are no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="NEPA takes pixel_values only: there are no inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="NEPA does not implement feed-forward chunking (as DINOv3 and ViT-MAE)")
    def test_feed_forward_chunking(self):
        pass


class NepaSegmentationModelTester(NepaModelTester):
    def __init__(self, parent):
        # Three blocks: the segmentation model reads four stages (the embeddings and every block of a 3-block NEPA).
        super().__init__(parent, num_hidden_layers=3)


class NepaForSemanticSegmentationTest(NepaModelTest):
    all_model_classes = (NepaForSemanticSegmentation,)

    def setUp(self):
        super().setUp()
        self.model_tester = NepaSegmentationModelTester(self)

    @unittest.skip(reason="NepaModelTest runs ConfigTester on the same NepaConfig")
    def test_config(self):
        pass

    @unittest.skip(reason="NepaModelTest checks the shapes of the other models")
    def test_model_shapes(self):
        pass

    @unittest.skip(reason="the segmentation model reads four backbone stages: 3 blocks is the smallest NEPA with four")
    def test_num_layers_is_small(self):
        pass


class NepaBackboneTest(backbone_common.BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (NepaBackbone,)
    config_class = NepaConfig
    has_attentions = True

    def setUp(self):
        self.model_tester = NepaModelTester(self)


def test_config_stand_in_covers_every_common_config_field():
    """The stand-in for transformers' `config_common_kwargs` must set every field of the installed `PreTrainedConfig`,
    as transformers' own check of the original does, so a field a new release adds is tested too."""
    import dataclasses

    from transformers import PreTrainedConfig

    stand_in = configuration_common.config_common_kwargs
    not_arguments = {"transformers_version", "is_encoder_decoder"}  # written by save_pretrained / fixed per class
    fields = {field.name for field in dataclasses.fields(PreTrainedConfig)} - not_arguments
    assert fields <= set(stand_in), f"fields missing from the stand-in: {sorted(fields - set(stand_in))}"
    defaults = PreTrainedConfig()
    assert not [key for key, value in stand_in.items() if key != "output_attentions" and getattr(defaults, key) == value]
