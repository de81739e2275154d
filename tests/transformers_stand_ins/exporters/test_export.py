# Stand-in: the sdist lacks tests/exporters/; its torch.export/ONNX mixin is for exporting text and generative models.
class ExportTesterMixin:
    pass
