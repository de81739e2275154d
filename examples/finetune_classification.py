"""Fine-tune NEPA for image classification with `Trainer` and the authors' recipe.

Starts from a NEPA pretraining checkpoint (ours or converted: bidirectional attention, zero head), a fine-tuned
checkpoint, or a preset (from scratch). Data: a Hub dataset, a local image folder (imagefolder layout), or the
built-ins `fashion_mnist` (Debian package, else the bundled subset), `fashion_mnist_debian`, `bundled`.

The authors' recipe, all on by default and all switchable by flags: layer-wise lr decay (0.65) with per-group
warmup + cosine, AdamW (wd 0.05 on matrices and the CLS token), EMA 0.9999 evaluated beside the online weights,
frozen patch embedding when starting from a pretrained model; timm's `create_transform` (RandomResizedCrop bicubic +
flip + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25) per sample and timm's Mixup 0.8 / CutMix 1.0 with
label smoothing 0.1 in the collator; evaluation through the saved image processor (resize 256 bicubic + centre
crop 224 at 224 px).

Examples:
    python examples/finetune_classification.py --model_name_or_path outputs/demo/pretrained \\
        --dataset_name fashion_mnist --output_dir outputs/ft --do_train --do_eval --max_steps 300 \\
        --per_device_train_batch_size 64 --max_eval_samples 1000
    python examples/finetune_classification.py --preset nepa-vit-micro --dataset_name path/to/folder ...

Writes to --output_dir: the model (`save_pretrained`) and image processor (the evaluation preprocessing), which
`pipeline("image-classification", model=output_dir)` serves, `ema.safetensors`, `*_results.json`, and
`data_split.json` (what was held out for evaluation; examples/evaluate_nepa.py reads it). Unreadable images are
skipped with a warning naming them and counted once per file (`train/eval/test_unreadable_images` in the results).

Long runs: on SIGTERM or SIGUSR1 (--preemption_signals) the current step finishes, `checkpoint-<step>` is written
and the script exits with status 75; the same command with `--resume_from_checkpoint latest` (the newest checkpoint
in --output_dir; none yet: from scratch) continues from it. A step with a non-finite loss or gradient norm makes no
update and is counted (`train_nonfinite_steps`); --max_nonfinite_steps (5) in a row stop the run, naming the step
and the last checkpoint.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, HfArgumentParser, set_seed

from nepa_hf import NEPA_PRESETS, NepaConfig, NepaForImageClassification
from nepa_hf.data.augmentation import AugmentationArguments
from nepa_hf.data.classification import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    check_labels,
    encode_labels,
    model_class_order,
    remap_labels,
    stratified_subset,
    train_validation_split,
    with_image_transform,
)
from nepa_hf.data.images import load_image_dataset, patch_aligned_size, resolve_column, split_names
from nepa_hf.evaluation.features import classification_metrics
from nepa_hf.hub.loading import load_pretrained
from nepa_hf.training.config_overrides import parse_config_overrides, preset_config
from nepa_hf.training.finetuning import NepaTrainer, NepaTrainingArguments
from nepa_hf.training.trainer_callbacks import trainer_checkpoint_to_resume
from nepa_hf.data.transforms import ImageProcessorTransform, per_channel

logger = logging.getLogger(__name__)

# Written beside the model: which split the model was evaluated on, so examples/evaluate_nepa.py can reuse a
# hold-out of the training split (and never score images the model trained on as held out).
DATA_SPLIT_FILE = "data_split.json"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "NEPA checkpoint (folder or Hub id): pretraining (ours or converted) or fine-tuned; a "
                          "preset name (e.g. nepa-vit-micro) trains from scratch like --preset."},
    )
    preset: str | None = field(
        default=None, metadata={"help": f"Train from scratch with a preset config: {sorted(NEPA_PRESETS)}."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "With --preset: config overrides 'key=value,key=value', e.g. 'hidden_size=64,num_hidden_layers=2'."},
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor folder or Hub id."})
    image_size: int | None = field(default=None, metadata={"help": "Training resolution (default: config.image_size)."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth (reference: 0.1 B / 0.2 L)."})
    is_causal: bool | None = field(default=None, metadata={"help": "Causal fine-tuning (default: bidirectional)."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a fine-tuned checkpoint's head of another size with a new one."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache Hub downloads."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models/datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})


@dataclass
class DataArguments:
    dataset_name: str = field(
        metadata={"help": "Hub dataset id, local image folder, or fashion_mnist / fashion_mnist_debian / bundled."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Split to evaluate on (default: 'validation' if present, else a stratified hold-out)."},
    )
    test_split: str = field(default="test", metadata={"help": "Split for --do_predict."})
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of each class held out when there is no validation split."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: auto-detect)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: auto-detect)."})
    train_fraction: float | None = field(
        default=None, metadata={"help": "Keep this fraction of every class of the training set (low-label studies)."}
    )
    image_mean: list[float] | None = field(
        default=None, metadata={"help": "Normalisation mean (default: the source checkpoint's processor, else 0.5)."}
    )
    image_std: list[float] | None = field(
        default=None, metadata={"help": "Normalisation std (default: the source checkpoint's processor, else 0.5)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of training data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of evaluation data."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of test data."})

    def __post_init__(self):
        if self.image_std is not None and min(self.image_std) <= 0:
            raise ValueError(f"--image_std must be positive, got {self.image_std}.")


def load_kwargs(data_args: DataArguments, model_args: ModelArguments) -> dict:
    kwargs = {}
    if data_args.dataset_config_name:
        kwargs["name"] = data_args.dataset_config_name
    if model_args.cache_dir:
        kwargs["cache_dir"] = model_args.cache_dir
    if model_args.token:
        kwargs["token"] = model_args.token
    return kwargs


def load_split(data_args: DataArguments, model_args: ModelArguments, split: str):
    return load_image_dataset(data_args.dataset_name, split=split, **load_kwargs(data_args, model_args))


def subsample(dataset, max_samples: int | None, seed: int):
    if max_samples is not None and max_samples < len(dataset):
        return dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def classifier_to_continue(model_args: ModelArguments) -> dict | None:
    """The `id2label` of a fine-tuned NEPA classifier whose head training continues (its classes must then be the
    dataset's), None for a pretrained or preset source, or with --ignore_mismatched_sizes (a new head)."""
    source = model_args.model_name_or_path
    if source is None or model_args.ignore_mismatched_sizes or (source in NEPA_PRESETS and not os.path.isdir(source)):
        return None
    config = AutoConfig.from_pretrained(source, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                        token=model_args.token, trust_remote_code=model_args.trust_remote_code)
    if not any(name.endswith("ForImageClassification") for name in (config.architectures or [])):
        return None
    return config.id2label


def load_model(model_args: ModelArguments, id2label: dict, label2id: dict):
    """(model, image processor of the source or None, started from pretrained weights?)."""
    if model_args.model_name_or_path in NEPA_PRESETS and not os.path.isdir(model_args.model_name_or_path):
        # a preset name where a checkpoint is expected: train that architecture from scratch
        if model_args.preset not in (None, model_args.model_name_or_path):
            raise ValueError("Pass either --model_name_or_path or --preset, not both.")
        model_args.preset, model_args.model_name_or_path = model_args.model_name_or_path, None
    overrides = {"id2label": id2label, "label2id": label2id}
    if model_args.drop_path_rate is not None:
        overrides["drop_path_rate"] = model_args.drop_path_rate
    if model_args.is_causal is not None:  # else the head's default: bidirectional (NepaConfig.is_causal)
        overrides["is_causal"] = model_args.is_causal
    if model_args.preset is not None:
        if model_args.model_name_or_path is not None:
            raise ValueError("Pass either --model_name_or_path or --preset, not both.")
        overrides.update(parse_config_overrides(model_args.config_overrides))
        config = preset_config(model_args.preset, overrides, model_args.image_size)
        return NepaForImageClassification(config), None, False
    if model_args.config_overrides:
        raise ValueError("--config_overrides only applies to --preset (training from scratch).")
    if model_args.model_name_or_path is None:
        raise ValueError("Pass --model_name_or_path (a NEPA checkpoint) or --preset (train from scratch).")

    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token,
                      trust_remote_code=model_args.trust_remote_code)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs)
    if config.model_type != NepaConfig.model_type:
        raise ValueError(f"{model_args.model_name_or_path} is a {config.model_type!r} checkpoint, not a NEPA one "
                         "(convert reference `vit_nepa` checkpoints first).")
    model = load_pretrained(
        NepaForImageClassification, model_args.model_name_or_path, dtype=torch.float32,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **overrides, **hub_kwargs,
    )
    try:
        processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name or model_args.model_name_or_path,
                                                       **hub_kwargs)
    except (OSError, ValueError):
        processor = None
    return model, processor, True


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataArguments, AugmentationArguments, NepaTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, aug_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, aug_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if training_args.do_train and training_args.max_steps == 0:
        # The Trainer would take 0 as a step count and fail later on an empty schedule: say what the flag takes.
        parser.error("--max_steps 0: give a positive number of optimizer updates, or leave --max_steps at -1 (the "
                     "default) to train for --num_train_epochs. To save a model without training, leave out "
                     "--do_train.")

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(f"Training arguments: {training_args}")

    checkpoint = None  # 'latest' (or no flag): the newest checkpoint-<step> in output_dir, if any
    if training_args.do_train:
        checkpoint = trainer_checkpoint_to_resume(training_args.output_dir, training_args.resume_from_checkpoint)
    set_seed(training_args.seed)

    # ---- data (every check happens here, before any training) ----
    train_dataset = load_split(data_args, model_args, data_args.train_split)
    image_column = resolve_column(train_dataset, data_args.image_column, IMAGE_COLUMN_CANDIDATES, "image")
    label_column = resolve_column(train_dataset, data_args.label_column, LABEL_COLUMN_CANDIDATES, "label")
    train_dataset, class_names = encode_labels(train_dataset, label_column)  # errors on gaps and on one class

    eval_dataset = None
    # What the model is evaluated on, saved beside it: examples/evaluate_nepa.py reuses a hold-out and refuses to
    # score images the model trained on.
    data_split = {"dataset": data_args.dataset_name, "train_split": data_args.train_split, "eval": None,
                  "validation_fraction": None, "seed": training_args.seed}
    evaluates_in_training = training_args.eval_strategy != "no" or training_args.eval_at_fractions
    if training_args.do_eval or (training_args.do_train and evaluates_in_training):
        split = data_args.eval_split
        if split is None and "validation" in split_names(data_args.dataset_name, **load_kwargs(data_args, model_args)):
            split = "validation"
        if split is None:
            logger.info(f"No 'validation' split: holding out {data_args.validation_fraction:.0%} of every class of "
                        f"the {data_args.train_split!r} split (seed {training_args.seed}).")
            train_dataset, eval_dataset = train_validation_split(
                train_dataset, label_column, data_args.validation_fraction, seed=training_args.seed
            )
            data_split.update(eval="held_out", validation_fraction=data_args.validation_fraction)
        else:
            eval_dataset = load_split(data_args, model_args, split)
            data_split["eval"] = split
        resolve_column(eval_dataset, image_column, (), "image")
        resolve_column(eval_dataset, label_column, (), "label")
        eval_dataset, _ = encode_labels(eval_dataset, label_column, class_names)
        eval_dataset = subsample(eval_dataset, data_args.max_eval_samples, training_args.seed)
        check_labels(eval_dataset, label_column, len(class_names), "evaluation")

    if data_args.train_fraction is not None:
        train_dataset = stratified_subset(train_dataset, label_column, fraction=data_args.train_fraction,
                                          seed=training_args.seed)
    train_dataset = subsample(train_dataset, data_args.max_train_samples, training_args.seed)
    check_labels(train_dataset, label_column, len(class_names), "train")

    predict_dataset = None
    if training_args.do_predict:
        predict_dataset = load_split(data_args, model_args, data_args.test_split)
        resolve_column(predict_dataset, image_column, (), "image")
        resolve_column(predict_dataset, label_column, (), "label")
        predict_dataset, _ = encode_labels(predict_dataset, label_column, class_names)
        predict_dataset = subsample(predict_dataset, data_args.max_predict_samples, training_args.seed)
        check_labels(predict_dataset, label_column, len(class_names), "test")

    # A classifier trained further keeps its head: its classes are matched to the dataset's by name (the same ones
    # in another order are remapped to the model's ids; other classes are refused).
    continued_labels = classifier_to_continue(model_args)
    model_order = None
    if continued_labels is not None:
        model_order = model_class_order(class_names, continued_labels, model_args.model_name_or_path)
    if model_order is not None:
        train_dataset, eval_dataset, predict_dataset = (
            None if dataset is None else remap_labels(dataset, label_column, class_names, model_order)
            for dataset in (train_dataset, eval_dataset, predict_dataset)
        )
        class_names = model_order

    # ---- model ----
    id2label = dict(enumerate(class_names))
    label2id = {name: i for i, name in id2label.items()}
    model, source_processor, pretrained = load_model(model_args, id2label, label2id)
    if training_args.freeze_patch_embeddings is None:  # reference: frozen when fine-tuning pretrained weights
        training_args.freeze_patch_embeddings = pretrained
    size = patch_aligned_size(model_args.image_size or model.config.image_size, model.config.patch_size)
    # The evaluation preprocessing, saved with the model, with the source checkpoint's normalisation.
    channels = model.config.num_channels
    mean, std = (
        per_channel(given, channels, f"--{name}") if given else
        per_channel(getattr(source_processor, name, None) or [0.5], channels, f"The source checkpoint's {name}")
        for name, given in (("image_mean", data_args.image_mean), ("image_std", data_args.image_std))
    )
    processor = aug_args.eval_image_processor(size, mean, std)
    logger.info(f"{len(train_dataset)} training images, {len(class_names)} classes, resolution {size}; "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; from "
                f"{'pretrained weights' if pretrained else 'scratch'}.")

    # ---- transforms: timm's per sample (training) or the image processor (evaluation); Mixup in the collator ----
    # Unreadable images are skipped (the collators drop them), counted per distinct file and reported.
    if training_args.do_train:
        train_dataset = with_image_transform(train_dataset, aug_args.train_transform(size, mean, std), image_column,
                                             label_column, mixable=True)
    if eval_dataset is not None:
        eval_dataset = with_image_transform(eval_dataset, ImageProcessorTransform(processor), image_column,
                                            label_column)
    if predict_dataset is not None:
        predict_dataset = with_image_transform(predict_dataset, ImageProcessorTransform(processor), image_column,
                                               label_column)
    collator = aug_args.collator(len(class_names), label_smoothing=training_args.label_smoothing_factor)

    trainer = NepaTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=collator,
        compute_metrics=classification_metrics(len(class_names)),
        processing_class=processor,
    )

    unreadable = {}  # split -> distinct unreadable images
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.exit_if_preempted()  # a preemption signal: checkpoint-<step> written, exit with status 75
        trainer.save_model()
        unreadable["train"] = train_dataset.unreadable.count(trainer.accelerator)
        train_result.metrics["train_unreadable_images"] = unreadable["train"]
        train_result.metrics["train_samples"] = len(train_dataset)
        if training_args.should_save:
            with open(os.path.join(training_args.output_dir, DATA_SPLIT_FILE), "w") as handle:
                json.dump(data_split, handle, indent=2)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_unreadable_images"] = unreadable["eval"] = eval_dataset.unreadable.count(trainer.accelerator)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        metrics = trainer.predict(predict_dataset, metric_key_prefix="test").metrics
        metrics["test_unreadable_images"] = unreadable["test"] = predict_dataset.unreadable.count(trainer.accelerator)
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)

    skipped = {key: value for key, value in unreadable.items() if value}
    if skipped:
        logger.warning(f"Skipped unreadable images (distinct files): {skipped}; the warnings above name them.")

    if not training_args.do_train and training_args.should_save:
        trainer.save_model()  # still give the output folder a servable model + processor
    card = {"finetuned_from": model_args.model_name_or_path,  # None when trained from scratch
            "tasks": "image-classification", "dataset": data_args.dataset_name, "tags": ["image-classification", "nepa"]}
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    elif training_args.should_save:
        trainer.create_model_card(**card)
    return trainer


if __name__ == "__main__":
    main()
