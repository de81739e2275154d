# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Model cards for NEPA checkpoints, generated from one template.

`make_model_card(spec, repo_id)` builds a `huggingface_hub.ModelCard` (YAML metadata + text) for a checkpoint
described by a `CheckpointSpec`. The converter writes one into every converted folder, the publisher into every
upload, and `scripts/make_model_cards.py` writes the committed cards under `model_cards/` for the published names
(`PUBLISHED_CHECKPOINTS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# Organisation our checkpoints are published under; `nepa_hf.hub.publish --repo-id` can name any other.
HUB_NAMESPACE = "nepa-hf"
PAPER_URL = "https://arxiv.org/abs/2512.16922"
PAPER_TITLE = "Next-Embedding Prediction Makes Strong Vision Learners"
EXAMPLE_IMAGE_URL = "http://images.cocodataset.org/val2017/000000039769.jpg"
IMAGENET = "ILSVRC/imagenet-1k"
IMAGENET_NAME = "ImageNet-1k"
FASHION_MNIST = "zalando-datasets/fashion_mnist"  # the Hub copy of the data behind `fashion_mnist` and `bundled`

# Every head the package registers with an Auto class, the Auto class that loads it, and its Hub pipeline tag.
AUTO_CLASS_OF_HEAD = {
    "NepaModel": "AutoModel",
    "NepaForPreTraining": "AutoModelForPreTraining",
    "NepaForImageClassification": "AutoModelForImageClassification",
    "NepaForSemanticSegmentation": "AutoModelForSemanticSegmentation",
    "NepaBackbone": "AutoBackbone",
}
PIPELINE_TAG_OF_HEAD = {
    "NepaModel": "image-feature-extraction",
    "NepaForPreTraining": "image-feature-extraction",
    "NepaForImageClassification": "image-classification",
    "NepaForSemanticSegmentation": "image-segmentation",
    "NepaBackbone": "image-feature-extraction",
}
CITATION = """@article{xu2025nepa,
  title   = {Next-Embedding Prediction Makes Strong Vision Learners},
  author  = {Xu, Sihan and Ma, Ziqiao and Chai, Wenhao and Chen, Xuweiyi and Jin, Weiyang and Chai, Joyce and
             Xie, Saining and Yu, Stella X.},
  journal = {arXiv preprint arXiv:2512.16922},
  year    = {2025}
}"""


@dataclass(frozen=True)
class ReportedResult:
    """A number taken from the paper or the authors' release (not measured by this project)."""

    metric_name: str
    value: float
    source_name: str
    source_url: str


@dataclass(frozen=True)
class CheckpointSpec:
    """Everything a card says about one checkpoint."""

    name: str
    architecture: str  # a key of AUTO_CLASS_OF_HEAD
    size: str  # e.g. "ViT-B/14"
    num_parameters: int
    image_size: int
    patch_size: int
    is_causal: bool
    source: str | None = None  # the authors' Hub repo the weights were converted from
    training: str = ""
    reported_results: tuple[ReportedResult, ...] = ()
    conversion_command: str | None = None
    extra_notes: tuple[str, ...] = field(default_factory=tuple)
    num_labels: int | None = None  # classifiers and segmenters not trained on ImageNet-1k
    # The training data, only where it is known: a readable name for the text (None: not recorded) and the Hub
    # dataset ids for the `datasets` metadata.
    dataset: str | None = None
    dataset_ids: tuple[str, ...] = ()
    # The saved image processor's settings (`to_dict()`); None: the released checkpoints' preprocessing.
    preprocessing: dict | None = None

    @property
    def is_classifier(self) -> bool:
        return self.architecture == "NepaForImageClassification"

    @property
    def is_segmenter(self) -> bool:
        return self.architecture == "NepaForSemanticSegmentation"

    @property
    def num_labels_text(self) -> str:
        return f"{self.num_labels} classes of its training labels" if self.num_labels else "1000 ImageNet-1k classes"

    @property
    def pipeline_tag(self) -> str:
        return PIPELINE_TAG_OF_HEAD[self.architecture]

    @property
    def auto_class(self) -> str:
        return AUTO_CLASS_OF_HEAD[self.architecture]


def _paper(metric: str, value: float) -> ReportedResult:
    return ReportedResult(metric, value, "NEPA paper (arXiv 2512.16922)", PAPER_URL)


def _release(metric: str, value: float, repo: str) -> ReportedResult:
    return ReportedResult(metric, value, "NEPA authors' release", f"https://huggingface.co/{repo}")


_PRETRAINING = (
    "Pretrained on ImageNet-1k images (no labels) with next-embedding prediction: causal attention, "
    "stop-gradient targets, negative cosine similarity."
)
_FINETUNING = (
    "The pretrained NEPA backbone fine-tuned on ImageNet-1k classification (1000 classes) with bidirectional "
    "attention, mean pooling over the patch tokens, `fc_norm` and a linear classifier."
)


def _published(**fields) -> CheckpointSpec:
    command = f"python -m nepa_hf.models.nepa.convert_nepa --input {fields['source']} --output {fields['name']}"
    return CheckpointSpec(conversion_command=command, dataset=IMAGENET_NAME, dataset_ids=(IMAGENET,), **fields)


PUBLISHED_CHECKPOINTS: dict[str, CheckpointSpec] = {
    spec.name: spec
    for spec in (
        _published(
            name="nepa-vit-b", architecture="NepaForPreTraining", size="ViT-B/14", num_parameters=85_527_552,
            image_size=224, patch_size=14, is_causal=True, source="SixAILab/nepa-base-patch14-224",
            training=_PRETRAINING,
            reported_results=(_paper("ImageNet-1k top-1 after fine-tuning (reported in the paper)", 83.8),),
        ),
        _published(
            name="nepa-vit-l", architecture="NepaForPreTraining", size="ViT-L/14", num_parameters=302_967_808,
            image_size=224, patch_size=14, is_causal=True, source="SixAILab/nepa-large-patch14-224",
            training=_PRETRAINING,
            reported_results=(_paper("ImageNet-1k top-1 after fine-tuning (reported in the paper)", 85.3),),
        ),
        _published(
            name="nepa-vit-b-in1k", architecture="NepaForImageClassification", size="ViT-B/14",
            num_parameters=86_299_624, image_size=224, patch_size=14, is_causal=False,
            source="SixAILab/nepa-base-patch14-224-sft", training=_FINETUNING,
            reported_results=(
                _paper("Top-1 accuracy (reported in the paper)", 83.8),
                _release("Top-1 accuracy of these released weights (reported by the authors)", 83.75,
                         "SixAILab/nepa-base-patch14-224-sft"),
            ),
        ),
        _published(
            name="nepa-vit-l-in1k", architecture="NepaForImageClassification", size="ViT-L/14",
            num_parameters=303_994_856, image_size=224, patch_size=14, is_causal=False,
            source="SixAILab/nepa-large-patch14-224-sft", training=_FINETUNING,
            reported_results=(
                _paper("Top-1 accuracy (reported in the paper)", 85.3),
                _release("Top-1 accuracy of these released weights (reported by the authors)", 85.40,
                         "SixAILab/nepa-large-patch14-224-sft"),
            ),
        ),
    )
}  # fmt: skip


def _size_name(hidden_size: int, num_layers: int, patch_size: int) -> str:
    known = {(192, 12): "ViT-Ti", (384, 12): "ViT-S", (768, 12): "ViT-B", (1024, 24): "ViT-L"}
    base = known.get((hidden_size, num_layers), f"ViT (width {hidden_size}, depth {num_layers})")
    return f"{base}/{patch_size}"


def head_classes() -> dict:
    """{class name: class} of every head in `AUTO_CLASS_OF_HEAD`."""
    from ..models.nepa.modeling_nepa import NepaForImageClassification, NepaForPreTraining, NepaModel
    from ..models.nepa.modeling_nepa_segmentation import NepaBackbone, NepaForSemanticSegmentation

    classes = (NepaModel, NepaForPreTraining, NepaForImageClassification, NepaForSemanticSegmentation, NepaBackbone)
    return {cls.__name__: cls for cls in classes}


_HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def describe_dataset(recorded: str | None) -> tuple[str | None, tuple[str, ...]]:
    """(name for the card text, Hub ids for the `datasets` metadata) of a dataset as a training run recorded it
    (`--dataset` / `--dataset_name`: a built-in name, a Hub id or a local folder). Only a value of the form
    `namespace/name` that is not a local path, or a built-in name with a Hub copy, goes into the metadata."""
    from ..data.images import BUILTIN_DATASETS

    if not recorded:
        return None, ()
    builtin = {
        "fashion_mnist": ("Fashion-MNIST", (FASHION_MNIST,)),
        "fashion-mnist": ("Fashion-MNIST", (FASHION_MNIST,)),
        "fashion_mnist_debian": ("Fashion-MNIST", (FASHION_MNIST,)),
        "bundled": (f"Fashion-MNIST ({BUILTIN_DATASETS['bundled']})", (FASHION_MNIST,)),
        "bundled_fashion_mnist": (f"Fashion-MNIST ({BUILTIN_DATASETS['bundled']})", (FASHION_MNIST,)),
        "bundled_photos": (BUILTIN_DATASETS["bundled_photos"], ()),
        "fashion-mnist-scenes": ("synthetic scenes of Fashion-MNIST items pasted on photo crops "
                                 "(`nepa_hf.data.segmentation`)", ()),
    }  # fmt: skip
    if recorded in builtin:
        return builtin[recorded]
    if _HUB_DATASET_ID.match(recorded) and not Path(recorded).expanduser().exists():
        return recorded, (recorded,)
    return f"`{recorded}`", ()


def spec_from_config(
    name: str,
    config,
    source: str | None = None,
    training: str = "",
    dataset: str | None = None,
    **overrides,
) -> CheckpointSpec:
    """A `CheckpointSpec` for any NEPA checkpoint (e.g. one trained with this project), from its `NepaConfig`.

    `dataset` is the training data as the run recorded it (see `describe_dataset`); None states none.
    """
    import torch

    classes = head_classes()
    architecture = next((a for a in (config.architectures or []) if a in classes), "NepaModel")
    with torch.device("meta"):
        num_parameters = sum(p.numel() for p in classes[architecture](config).parameters())
    dataset_name, dataset_ids = describe_dataset(dataset)
    spec = CheckpointSpec(
        name=name,
        architecture=architecture,
        size=_size_name(config.hidden_size, config.num_hidden_layers, config.patch_size),
        num_parameters=num_parameters,
        image_size=config.image_size,
        patch_size=config.patch_size,
        is_causal=config.resolved_is_causal,
        source=source,
        training=training,
        num_labels=config.num_labels if PIPELINE_TAG_OF_HEAD[architecture] != "image-feature-extraction" else None,
        dataset=dataset_name,
        dataset_ids=dataset_ids,
    )
    return replace(spec, **overrides)


def card_for_conversion(source: str, config, repo_id: str, ema: bool = False, revision: str | None = None) -> ModelCard:
    """The card the converter writes: the published card for the authors' four repos, a generic one otherwise."""
    command = f"python -m nepa_hf.models.nepa.convert_nepa --input {source} --output {repo_id}" + (" --ema" if ema else "")
    if revision:
        command += f" --revision {revision}"
    known = [spec for spec in PUBLISHED_CHECKPOINTS.values() if spec.source == source]
    notes = ("These are the EMA weights of the release (`pytorch_model_ema.bin`).",) if ema else ()
    if known:
        spec = replace(known[0], name=repo_id, conversion_command=command, extra_notes=notes)
    else:
        is_hub = "/" in source and not Path(source).exists()
        spec = spec_from_config(
            repo_id,
            config,
            source=source if is_hub else None,
            conversion_command=command,
            extra_notes=notes,
            training="Converted from a checkpoint in the authors' `vit_nepa` layout.",
        )
    return make_model_card(spec, repo_id=repo_id)


# --------------------------------------------------------------------------------------------------------------
# The template
# --------------------------------------------------------------------------------------------------------------


def card_metadata(spec: CheckpointSpec) -> ModelCardData:
    tags = ["nepa", "vision", "vit", "self-supervised-learning", spec.pipeline_tag, "custom_code"]
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=IMAGENET,
            dataset_name="ImageNet-1k",
            dataset_split="validation",
            metric_type="accuracy",
            metric_name=result.metric_name,
            metric_value=result.value,
            source_name=result.source_name,
            source_url=result.source_url,
            verified=False,
        )
        # The model-index groups metrics per task and data set under one source, so it lists the paper's numbers
        # only; the card's results table gives every number with its own source.
        for result in spec.reported_results
        if result.source_url == PAPER_URL
    ]
    return ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=spec.pipeline_tag,
        tags=tags,
        datasets=list(spec.dataset_ids) or None,
        metrics=["accuracy"] if eval_results else None,
        base_model=spec.source,
        model_name=spec.name,
        eval_results=eval_results or None,
    )


def usage_snippet(spec: CheckpointSpec, repo_id: str, example_image: str = EXAMPLE_IMAGE_URL) -> str:
    """Python that loads the checkpoint with nothing but transformers (the code ships with the weights)."""
    common = f'''import torch
from transformers import AutoImageProcessor, {{auto_class}}
from transformers.image_utils import load_image

image = load_image("{example_image}")
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
model = {{auto_class}}.from_pretrained("{repo_id}", trust_remote_code=True).eval()
inputs = processor(image, return_tensors="pt")
'''
    if spec.is_classifier:
        return (
            common.format(auto_class="AutoModelForImageClassification")
            + """with torch.no_grad():
    logits = model(**inputs).logits
top5 = logits.softmax(-1)[0].topk(5)
for score, index in zip(top5.values.tolist(), top5.indices.tolist()):
    print(f"{model.config.id2label[index]}: {score:.3f}")
"""
        )
    if spec.is_segmenter:
        return (
            common.format(auto_class="AutoModelForSemanticSegmentation")
            + """with torch.no_grad():
    outputs = model(**inputs)
segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
print(segmentation.shape)  # (height, width) of the image: one class index per pixel
print(sorted(model.config.id2label[index] for index in segmentation.unique().tolist()))
"""
        )
    if spec.architecture == "NepaBackbone":
        return (
            common.format(auto_class="AutoBackbone")
            + """with torch.no_grad():
    feature_maps = model(**inputs).feature_maps
print(model.out_features, [tuple(f.shape) for f in feature_maps])  # (1, hidden, H/patch, W/patch) per stage
"""
        )
    if spec.architecture == "NepaForPreTraining":
        return (
            common.format(auto_class="AutoModelForPreTraining")
            + """with torch.no_grad():
    outputs = model(**inputs)
print(outputs.loss)                     # next-embedding prediction loss (negative cosine, in [-1, 1])
print(outputs.last_hidden_state.shape)  # (1, 1 + num_patches, hidden): position t predicts patch t + 1
features = outputs.pooler_output        # mean of the patch tokens, (1, hidden)
"""
        )
    return (
        common.format(auto_class="AutoModel")
        + """with torch.no_grad():
    outputs = model(**inputs)
print(outputs.last_hidden_state.shape)  # (1, 1 + num_patches, hidden)
features = outputs.pooler_output
"""
    )


def _details_table(spec: CheckpointSpec) -> str:
    grid = spec.image_size // spec.patch_size
    rows = [
        ("Architecture", f"{spec.size} (`{spec.architecture}`), CLS token, 2D RoPE, QK-norm, LayerScale"),
        ("Parameters", f"{spec.num_parameters:,}"),
        ("Input", f"{spec.image_size}x{spec.image_size} RGB, {grid}x{grid} patches of {spec.patch_size}x"
                  f"{spec.patch_size} (any size divisible by the patch size runs)"),
        ("Attention", "causal (pretraining setting)" if spec.is_causal else "bidirectional (fine-tuning setting)"),
        ("Training data", _dataset_text(spec)),
        ("Weights", f"converted from [{spec.source}](https://huggingface.co/{spec.source})" if spec.source
                    else "converted from the authors' `vit_nepa` layout" if spec.conversion_command
                    else "trained with nepa-hf"),
        ("Paper", f"[{PAPER_TITLE}]({PAPER_URL})"),
        ("License", "Apache-2.0"),
    ]  # fmt: skip
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _dataset_text(spec: CheckpointSpec) -> str:
    if spec.dataset is None:
        return "not recorded"
    links = ", ".join(f"[{i}](https://huggingface.co/datasets/{i})" for i in spec.dataset_ids)
    if spec.dataset_ids == (spec.dataset,):
        return links
    return f"{spec.dataset} ({links})" if links else spec.dataset


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _numbers(values) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def preprocessing_steps(settings: dict | None, image_size: int) -> str:
    """What the image processor with these `to_dict()` settings does, in words (None: the released checkpoints'
    preprocessing, which is `NepaImageProcessor`'s default)."""
    settings = settings or {"size": {"height": image_size, "width": image_size}}
    size = settings.get("size") or {"height": 224, "width": 224}
    resample = settings.get("resample")
    resample = "bilinear" if resample is None else _RESAMPLE_NAMES.get(int(resample), f"resample={resample}")
    crop = settings.get("crop_size") if settings.get("do_center_crop") else None
    steps = []
    if settings.get("do_resize", True):
        if "height" in size and "width" in size:
            no_crop = "" if crop else ", no crop"
            steps.append(f"resize straight to {size['height']}x{size['width']} ({resample}{no_crop})")
        elif "shortest_edge" in size:
            steps.append(f"resize the shorter side to {size['shortest_edge']} ({resample})")
        else:
            steps.append(f"resize to {size} ({resample})")
    if crop:
        steps.append(f"centre-crop {crop.get('height')}x{crop.get('width')}")
    if settings.get("do_rescale", True):
        factor = float(settings.get("rescale_factor", 1 / 255))
        steps.append(f"rescale by 1/{1 / factor:g}" if factor < 1 else f"rescale by {factor:g}")
    if settings.get("do_normalize", True):
        mean, std = settings.get("image_mean", [0.5] * 3), settings.get("image_std", [0.5] * 3)
        if list(mean) == list(std):
            steps.append(f"normalise with mean = std = {_numbers(mean)}")
        else:
            steps.append(f"normalise with mean = {_numbers(mean)} and std = {_numbers(std)}")
    return ", ".join(steps)


def _results_section(spec: CheckpointSpec) -> str:
    if not spec.reported_results:
        return ""
    rows = "\n".join(
        f"| {r.metric_name} | {r.value:g} | [{r.source_name}]({r.source_url}) |" for r in spec.reported_results
    )
    return f"""## Results (reported, not re-measured here)

| ImageNet-1k validation | Top-1 (%) | Source |
|---|---|---|
{rows}

These numbers are quoted from the sources listed; nepa-hf did not re-run the ImageNet-1k evaluation. The authors'
evaluation script resizes the short side to 256 (bicubic) and centre-crops 224 (ViT-B), or resizes to 235x235 and
centre-crops 224 (ViT-L).

"""


def model_card_text(spec: CheckpointSpec, repo_id: str, example_image: str = EXAMPLE_IMAGE_URL) -> str:
    """The card body (everything after the YAML metadata)."""
    if spec.is_classifier and spec.num_labels:
        what = f"an image classifier ({spec.size}, {spec.num_labels} classes) built on a NEPA backbone"
    elif spec.is_classifier:
        what = f"an ImageNet-1k classifier ({spec.size}) built on a NEPA-pretrained backbone"
    elif spec.is_segmenter:
        what = (
            f"a semantic-segmentation model ({spec.size} NEPA backbone, multi-scale neck and UperNet head, "
            f"{spec.num_labels} classes)"
        )
    elif spec.architecture == "NepaBackbone":
        what = (
            f"a NEPA {spec.size} backbone (`NepaBackbone`: feature maps of the blocks in `config.out_indices`, for "
            "dense tasks)"
        )
    elif spec.architecture == "NepaModel":
        what = f"a NEPA {spec.size} encoder (`NepaModel`, no task head)"
    else:
        what = f"a NEPA-pretrained {spec.size} backbone (the causal pretraining model, no task head)"
    provenance = ""
    if spec.conversion_command:
        provenance = (
            f"""## Conversion

Made from the authors' checkpoint with nepa-hf's converter, which maps every tensor one-to-one without changing
any value (and can convert back with `--to-reference`):

```bash
{spec.conversion_command}
```

nepa-hf's forward pass is tested against an independent implementation of the authors' architecture.
{" ".join(spec.extra_notes)}""".rstrip()
            + "\n"
        )

    fine_tune = ""
    if spec.pipeline_tag == "image-feature-extraction":
        fine_tune = f"""
To fine-tune for classification, load it into the classification head; attention switches to bidirectional
and the classifier starts at zero, as in the paper's fine-tuning:

```python
from transformers import AutoModelForImageClassification
classifier = AutoModelForImageClassification.from_pretrained("{repo_id}", num_labels=10, trust_remote_code=True)
```
"""
    if spec.dataset == IMAGENET_NAME:  # the authors' weights
        limitations = [
            "Trained on ImageNet-1k only (about 1.28M object-centric photos); it inherits that data set's biases and "
            "has not been evaluated for robustness, fairness or out-of-distribution inputs."
        ]
    elif spec.dataset is not None:
        limitations = [
            f"Trained on {spec.dataset} only; not evaluated beyond that, and not for robustness, fairness or "
            "out-of-distribution inputs."
        ]
    else:
        limitations = [
            "Its training data is not recorded here; not evaluated for robustness, fairness or out-of-distribution "
            "inputs."
        ]
    if spec.is_classifier or spec.is_segmenter:
        limitations.append(f"Predicts the {spec.num_labels_text} only; fine-tune for other label sets.")
    else:
        limitations.append(
            "The authors report weak linear-probing results for NEPA: fine-tune the backbone rather than training "
            "a linear head on frozen features."
        )
    if spec.reported_results:
        limitations.append(
            "The processor reproduces the released checkpoints' preprocessing (straight resize); the accuracies "
            "above were measured by the authors with their resize-and-centre-crop evaluation protocol."
        )
    limitation_lines = "\n".join(f"- {line}" for line in limitations)
    training = f"\n{spec.training}\n" if spec.training else ""
    preprocessing = preprocessing_steps(spec.preprocessing, spec.image_size)
    return f"""# {spec.name}

NEPA (Next-Embedding Predictive Autoregression) trains a plain Vision Transformer to predict, with causal
attention, the embedding of the next image patch from the previous ones; the targets are the model's own patch
embeddings under stop-gradient and the loss is negative cosine similarity. There is no pixel decoder, tokenizer,
contrastive pair or momentum encoder. This checkpoint is {what},
in the nepa-hf format for Hugging Face transformers.
{training}
{_details_table(spec)}

## How to use

The model code ships with the weights, so transformers alone is enough (`trust_remote_code=True`):

```python
{usage_snippet(spec, repo_id, example_image).rstrip()}
```

With `pip install nepa-hf` and `import nepa_hf`, the same calls work without `trust_remote_code`.
{fine_tune}
For LoRA with PEFT, NEPA's attention projections are `q_proj`, `k_proj`, `v_proj` and `o_proj` (not ViT's `query` /
`value`) and its MLP's `up_proj` / `down_proj`: `LoraConfig(target_modules=["q_proj", "v_proj"], ...)`; a
classification head trains in full with `modules_to_save=["classifier", "fc_norm"]`.

## Preprocessing

`AutoImageProcessor` returns `NepaImageProcessor` (torchvision backend) where torchvision is installed and
`NepaImageProcessorPil` (PIL backend, same settings) where it is not: {preprocessing}.
Other resolutions divisible by {spec.patch_size} also run (`processor(image, size={{"height": 448, "width": 448}})`),
since positions come from 2D RoPE rather than a learned table; accuracy at other resolutions has not been measured.

{_results_section(spec)}## Limitations

{limitation_lines}

{provenance}
## Citation

```bibtex
{CITATION}
```
"""


def make_model_card(
    spec: CheckpointSpec, repo_id: str | None = None, example_image: str = EXAMPLE_IMAGE_URL
) -> ModelCard:
    """The card for `spec`, with usage code that loads `repo_id` (default: `HUB_NAMESPACE/spec.name`)."""
    repo_id = repo_id or f"{HUB_NAMESPACE}/{spec.name}"
    metadata = card_metadata(spec)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{model_card_text(spec, repo_id, example_image)}")


def write_model_cards(output_dir: str | Path, namespace: str = HUB_NAMESPACE) -> list[Path]:
    """Write `output_dir/<name>/README.md` for every published checkpoint; returns the paths."""
    paths = []
    for name, spec in PUBLISHED_CHECKPOINTS.items():
        path = Path(output_dir) / name / "README.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_model_card(spec, repo_id=f"{namespace}/{name}").save(path)
        paths.append(path)
    return paths


__all__ = [
    "CheckpointSpec",
    "ReportedResult",
    "PUBLISHED_CHECKPOINTS",
    "HUB_NAMESPACE",
    "make_model_card",
    "model_card_text",
    "card_metadata",
    "usage_snippet",
    "spec_from_config",
    "describe_dataset",
    "preprocessing_steps",
    "head_classes",
    "AUTO_CLASS_OF_HEAD",
    "PIPELINE_TAG_OF_HEAD",
    "card_for_conversion",
    "write_model_cards",
]
