"""transformers' own `ImageProcessingTestMixin` on NEPA's two image processor backends (torchvision: `NepaImageProcessor`,
PIL: `NepaImageProcessorPil`), from the source distribution of the installed transformers (see transformers_common.py).
"""

import unittest

import pytest

from nepa_hf import NepaImageProcessor, NepaImageProcessorPil
from transformers_common import load

image_processing_common = load("test_image_processing_common")

pytestmark = pytest.mark.slow


class NepaImageProcessingTester(image_processing_common.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 18, "width": 18})
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs.setdefault("num_labels", 5)  # post_process_semantic_segmentation
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # transformers finds a model's processors by the test folder's name in its own table, which lists only the
        # families in the library; NEPA's are registered with AutoImageProcessor instead.
        return {"torchvision": NepaImageProcessor, "pil": NepaImageProcessorPil}


class NepaImageProcessingTest(
    image_processing_common.ImageProcessingTestMixin,
    image_processing_common.PostProcessSemanticSegmentationTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = NepaImageProcessingTester

    @unittest.skip(
        reason="its subprocess loads the folder without `import nepa_hf` or trust_remote_code, which only a family "
        "inside transformers can do; test_auto_and_pipelines.py::test_trust_remote_code_falls_back_to_pil_without_"
        "torchvision runs the PIL backend without torchvision through remote code"
    )
    def test_pil_can_run_without_torchvision(self):
        pass
