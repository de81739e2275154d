#!/usr/bin/env python
# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune NEPA for semantic segmentation with the transformers Trainer.

Model: `NepaForSemanticSegmentation` (NEPA backbone, bidirectional attention; multi-scale neck; UperNet decode head;
FCN auxiliary head), built from a NEPA checkpoint (`--model_name_or_path`) or from scratch (`--config_preset`).

Data (all in the ADE20K `scene_parse_150` layout: an image column and an annotation column of class-index maps):
  * `--dataset_name scene_parse_150 --do_reduce_labels --num_labels 150` : a Hub dataset with data files (datasets
    4+ no longer runs loading scripts; use a parquet copy of ADE20K if a repo only has a script), or a local folder
    of parquet/arrow files that `datasets.load_dataset` reads;
  * `--data_dir DIR` : image/mask pairs in DIR/{train,validation}/{images,masks}/NAME.*;
  * neither : the built-in offline task, Fashion-MNIST items pasted on real-photo crops (11 classes with background).

Training: random scale / crop / flip applied jointly to images and masks, cross-entropy with ignore index 255
(+ 0.4 x auxiliary loss), AdamW with layer-wise lr decay (`--layer_decay`). Evaluation: mean IoU / pixel accuracy
through the local `mean_iou` evaluate module (`nepa_hf.evaluation.features.load_metric`), during training on `--crop_size` inputs and, at the end, at
the original resolution with whole-image or sliding-window inference (`--final_eval_mode`).

Example (offline, CPU, a few minutes):
    python examples/demo.py --output_dir outputs/demo     # saves a NEPA-pretrained micro model in outputs/demo/pretrained
    python examples/finetune_segmentation.py --model_name_or_path outputs/demo/pretrained \
        --output_dir outputs/seg-scenes --do_train --do_eval --max_steps 300 --learning_rate 1e-3 \
        --per_device_train_batch_size 16 --eval_strategy no --use_cpu
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, HfArgumentParser, set_seed

from nepa_hf import NepaConfig, NepaForSemanticSegmentation, NepaImageProcessor
from nepa_hf.evaluation.features import local_metric_path
from nepa_hf.hub.loading import load_pretrained
from nepa_hf.training.config_overrides import parse_config_overrides
from nepa_hf.training.finetuning import AutoWorkersTrainingArguments, NepaTrainer, layer_decay_parameter_groups
from nepa_hf.training.trainer_callbacks import trainer_checkpoint_to_resume
from nepa_hf.evaluation.segmentation import sliding_window_inference, whole_inference
from nepa_hf.data.segmentation import (
    FASHION_SCENES_LABELS,
    check_label_maps,
    fashion_scenes_dataset,
    random_scale_crop_flip,
    segmentation_folder_dataset,
)
from nepa_hf.data.images import patch_aligned_size
from nepa_hf.data.transforms import to_rgb

logger = logging.getLogger(__name__)

MEAN_IOU_METRIC = local_metric_path("mean_iou")  # shipped with nepa_hf, loads offline


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A NEPA checkpoint (pretrained, classification or segmentation). Unset: train from scratch."},
    )
    config_preset: str = field(
        default="nepa-vit-micro", metadata={"help": "NepaConfig preset used when training from scratch."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "NepaConfig fields to override, e.g. 'decode_hidden_size=64,use_auxiliary_head=false'. With a "
            "checkpoint, change head and regularisation fields only (the backbone shape comes from the checkpoint)."
        },
    )
    layer_decay: float = field(
        default=0.65, metadata={"help": "Layer-wise lr decay: block i gets decay^(L-1-i), heads 1. 1.0 disables."}
    )
    freeze_backbone: bool = field(
        default=False, metadata={"help": "Train only the neck and heads (a probe of the backbone's features)."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset (e.g. scene_parse_150) or a local dataset folder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches downloaded data."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder with {train,validation}/{images,masks}/ image/mask pairs."}
    )
    train_split: str = field(default="train")
    validation_split: str = field(default="validation")
    image_column: str = field(default="image")
    label_column: str = field(default="annotation")
    do_reduce_labels: bool = field(
        default=False, metadata={"help": "ADE20K-style maps: label 0 means 'no label' (-> 255), others minus 1."}
    )
    num_labels: int | None = field(default=None, metadata={"help": "Number of classes (after label reduction)."})
    id2label_file: str | None = field(default=None, metadata={"help": 'JSON file {"0": "wall", ...}.'})
    crop_size: int | None = field(
        default=None, metadata={"help": "Training crop and evaluation size (default 512, or the scene size for the scenes "
                                        "task; a default is rounded down to a multiple of the patch size)."}
    )
    min_scale: float = field(default=0.5, metadata={"help": "Random-scale range lower bound (x short side)."})
    max_scale: float = field(default=2.0, metadata={"help": "Random-scale range upper bound."})
    base_size: int | None = field(
        default=None, metadata={"help": "Short side before random scaling and at test time (default crop_size)."}
    )
    final_eval_mode: str = field(
        default="slide",
        metadata={"help": "End-of-training evaluation at the original resolution: 'slide', 'whole' or 'none'."},
    )
    slide_stride: int | None = field(default=None, metadata={"help": "Sliding-window stride (default 2/3 crop)."})
    num_train_scenes: int = field(default=2000, metadata={"help": "Scenes task: number of training scenes."})
    num_eval_scenes: int = field(default=500, metadata={"help": "Scenes task: number of validation scenes."})
    scene_size: int = field(default=64, metadata={"help": "Scenes task: image side."})
    scene_items: list[int] = field(
        default_factory=lambda: [2, 4], metadata={"help": "Scenes task: min and max number of items per scene."}
    )
    scene_item_size: list[int] | None = field(
        default=None, metadata={"help": "Scenes task: min and max item side in pixels (default 5/16-5/8 of the scene)."}
    )
    scenes_source: str = field(default="bundled", metadata={"help": "Fashion-MNIST source: bundled/debian/auto."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)

    def __post_init__(self):
        if self.dataset_name and self.data_dir:
            raise ValueError("Pass either --dataset_name or --data_dir, not both.")
        if self.final_eval_mode not in ("slide", "whole", "none"):
            raise ValueError(f"--final_eval_mode must be 'slide', 'whole' or 'none', got {self.final_eval_mode!r}.")
        self.crop_size_given = self.crop_size is not None
        if self.crop_size is None:
            self.crop_size = 512 if (self.dataset_name or self.data_dir) else self.scene_size


def load_splits(data_args: DataArguments, seed: int):
    """(train, validation, id2label) as datasets with `image` / `annotation` columns."""
    if data_args.dataset_name:
        import datasets

        raw = datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=data_args.cache_dir
        )
        train, validation = raw[data_args.train_split], raw[data_args.validation_split]
        train = train.rename_columns({data_args.image_column: "image", data_args.label_column: "annotation"})
        validation = validation.rename_columns({data_args.image_column: "image", data_args.label_column: "annotation"})
    elif data_args.data_dir:
        train = segmentation_folder_dataset(data_args.data_dir, data_args.train_split)
        validation = segmentation_folder_dataset(data_args.data_dir, data_args.validation_split)
    else:
        scene_kwargs = dict(
            image_size=data_args.scene_size,
            items_per_scene=tuple(data_args.scene_items),
            item_size=tuple(data_args.scene_item_size) if data_args.scene_item_size else None,
            source=data_args.scenes_source,
        )
        train = fashion_scenes_dataset(data_args.num_train_scenes, split="train", seed=seed, **scene_kwargs)
        validation = fashion_scenes_dataset(data_args.num_eval_scenes, split="test", seed=seed + 1, **scene_kwargs)
        return train, validation, dict(enumerate(FASHION_SCENES_LABELS))

    if data_args.id2label_file:
        id2label = {int(k): v for k, v in json.loads(Path(data_args.id2label_file).read_text()).items()}
    elif data_args.num_labels:
        id2label = {i: f"class_{i}" for i in range(data_args.num_labels)}
    else:
        raise ValueError("Pass --num_labels or --id2label_file for a Hub dataset or a data folder.")
    return train, validation, id2label


def main():
    # TrainingArguments whose --dataloader_num_workers defaults by device, as in the other scripts.
    parser = HfArgumentParser((ModelArguments, DataArguments, AutoWorkersTrainingArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    # The transforms read the raw `image` / `annotation` columns, which are not forward() arguments.
    training_args.remove_unused_columns = False

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", handlers=[logging.StreamHandler()])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training/evaluation parameters {training_args}")
    set_seed(training_args.seed)

    # ---------------------------------------------------------------------------------------------- data
    train_dataset, eval_dataset, id2label = load_splits(data_args, training_args.seed)
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    label2id = {name: i for i, name in id2label.items()}
    num_labels = len(id2label)

    # ---------------------------------------------------------------------------------------------- model
    overrides = parse_config_overrides(model_args.config_overrides)
    label_kwargs = dict(id2label=id2label, label2id=label2id)
    if model_args.model_name_or_path:
        config = NepaConfig.from_pretrained(model_args.model_name_or_path, **label_kwargs, **overrides)
    else:
        config = NepaConfig.from_preset(model_args.config_preset, **label_kwargs, **overrides)
    if model_args.model_name_or_path:
        model = load_pretrained(
            NepaForSemanticSegmentation, model_args.model_name_or_path, config=config, ignore_mismatched_sizes=True,
            dtype=torch.float32,
        )
    else:
        model = NepaForSemanticSegmentation(config)
    if model_args.freeze_backbone:
        model.nepa.requires_grad_(False)
    # The default follows the data (e.g. 64-px scenes): fitted to the model's patches (a patch-7 model: 63).
    data_args.crop_size = patch_aligned_size(data_args.crop_size, config.patch_size, "--crop_size",
                                             round_down=not data_args.crop_size_given)
    crop = (data_args.crop_size, data_args.crop_size)
    base_size = data_args.base_size or data_args.crop_size

    # The saved processor resizes inputs to the training crop size (images bilinear, masks nearest): it is the
    # evaluation transform and what the pipeline applies. Training crops do their own geometry (do_resize=False).
    image_processor = NepaImageProcessor(
        size={"height": crop[0], "width": crop[1]}, do_reduce_labels=data_args.do_reduce_labels
    )
    if model_args.model_name_or_path and (Path(model_args.model_name_or_path) / "preprocessor_config.json").exists():
        saved = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)
        image_processor.image_mean, image_processor.image_std = saved.image_mean, saved.image_std

    def to_model_inputs(images, masks, **kwargs):
        return image_processor(images, segmentation_maps=masks, return_tensors="pt", **kwargs)

    def train_transform(batch):
        # Fresh numpy generator per call, seeded from torch (seeded by the Trainer, distinct per dataloader worker).
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        pairs = [
            random_scale_crop_flip(
                image, mask, crop, rng, base_size=base_size, scale_range=(data_args.min_scale, data_args.max_scale)
            )
            for image, mask in zip(batch["image"], batch["annotation"])
        ]
        return dict(to_model_inputs([p[0] for p in pairs], [p[1] for p in pairs], do_resize=False))

    def eval_transform(batch):
        return dict(to_model_inputs(batch["image"], batch["annotation"]))

    def collate_fn(examples):
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": check_label_maps(
                torch.stack([example["labels"] for example in examples]), num_labels, config.semantic_loss_ignore_index
            ),
        }

    train_inputs = train_dataset.with_transform(train_transform)
    eval_inputs = eval_dataset.with_transform(eval_transform)

    # ---------------------------------------------------------------------------------------------- metrics
    metric = evaluate.load(str(MEAN_IOU_METRIC))
    ignore_index = config.semantic_loss_ignore_index

    def summarise(results: dict, prefix: str = "") -> dict:
        summary = {f"{prefix}{k}": float(results[k]) for k in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        for i, value in enumerate(results["per_category_iou"]):
            summary[f"{prefix}iou_{id2label[i]}"] = float(value)
        return summary

    def preprocess_logits_for_metrics(logits, labels):
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)

    def compute_metrics(eval_pred, compute_result: bool = True):
        predictions, references = eval_pred.predictions, eval_pred.label_ids
        if torch.is_tensor(predictions):  # batch_eval_metrics: one batch at a time
            predictions, references = predictions.cpu().numpy(), references.cpu().numpy()
        metric.add_batch(predictions=list(predictions), references=list(references))
        if not compute_result:
            return {}
        return summarise(metric.compute(num_labels=num_labels, ignore_index=ignore_index))

    # ---------------------------------------------------------------------------------------------- trainer
    class SegmentationTrainer(NepaTrainer):  # its long-run guards and FSDP2-safe save; the optimizer below
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                groups = layer_decay_parameter_groups(  # the same rule as classification fine-tuning
                    model or self.model, self.args.learning_rate, self.args.weight_decay, model_args.layer_decay
                )
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

    trainer = SegmentationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_inputs if training_args.do_train else None,
        eval_dataset=eval_inputs if training_args.do_eval else None,
        data_collator=collate_fn,
        processing_class=image_processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
    )

    # ---------------------------------------------------------------------------------------------- train
    if training_args.do_train:
        resume = training_args.resume_from_checkpoint  # 'latest': the newest checkpoint-<step> in --output_dir
        checkpoint = trainer_checkpoint_to_resume(training_args.output_dir, resume) if resume is not None else None
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.exit_if_preempted()  # a preemption signal: checkpoint-<step> written, exit with status 75
        trainer.save_model()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    # ---------------------------------------------------------------------------------------------- evaluate
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

        if data_args.final_eval_mode != "none":
            # Protocol evaluation: short side resized to base_size, whole-image or sliding-window logits,
            # upsampled to the original annotation size and compared with it.
            model = trainer.model.eval()
            device = next(model.parameters()).device
            final_metric = evaluate.load(str(MEAN_IOU_METRIC))
            for example in tqdm(eval_dataset, desc=f"{data_args.final_eval_mode} eval",
                                disable=not trainer.is_world_process_zero()):
                image, mask = to_rgb(example["image"]), np.asarray(example["annotation"])  # 16-bit: processor rule
                scale = base_size / min(image.width, image.height)
                size = (max(1, round(image.height * scale)), max(1, round(image.width * scale)))
                resized = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                pixel_values = image_processor(resized, do_resize=False, return_tensors="pt").pixel_values.to(device)
                if data_args.final_eval_mode == "slide":
                    logits = sliding_window_inference(model, pixel_values, crop, stride=data_args.slide_stride)
                else:
                    logits = whole_inference(model, pixel_values)
                logits = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
                final_metric.add_batch(predictions=[logits[0].argmax(0).cpu().numpy()], references=[mask])
            final = final_metric.compute(
                num_labels=num_labels, ignore_index=ignore_index, reduce_labels=data_args.do_reduce_labels
            )
            final_metrics = summarise(final, prefix=f"{data_args.final_eval_mode}_")
            trainer.log_metrics("final_eval", final_metrics)
            trainer.save_metrics("final_eval", final_metrics)

    if training_args.do_train and trainer.is_world_process_zero():
        kwargs = {"tasks": "image-segmentation", "tags": ["image-segmentation", "nepa"]}
        if model_args.model_name_or_path:
            kwargs["finetuned_from"] = model_args.model_name_or_path
        kwargs["dataset"] = data_args.dataset_name or data_args.data_dir or "fashion-mnist-scenes"
        if training_args.push_to_hub:
            trainer.push_to_hub(**kwargs)
        else:
            trainer.create_model_card(**kwargs)


if __name__ == "__main__":
    main()
