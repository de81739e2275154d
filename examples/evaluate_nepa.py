"""Evaluate NEPA models on an image-classification dataset.

* `--task accuracy`: top-1/top-5 accuracy of a fine-tuned classifier (the reference evaluation transform: resize
  the short side to size / crop_pct, centre crop).
* `--task knn` / `--task linear_probe`: frozen-backbone evaluation of any NEPA checkpoint (pretraining or
  fine-tuned): pooled features of the training and evaluation splits, then a weighted k-NN (k=20, T=0.07) and/or
  a logistic-regression probe. The quick way to compare pretrained backbones without fine-tuning.
* `--task all`: everything that applies to the checkpoint.

Examples:
    python examples/evaluate_nepa.py --model_name_or_path outputs/ft --dataset_name fashion_mnist --task accuracy
    python examples/evaluate_nepa.py --model_name_or_path outputs/demo/pretrained --dataset_name fashion_mnist \\
        --task knn --task linear_probe --max_train_samples 5000 --pooling mean
"""

import argparse
import json
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

import nepa_hf  # noqa: F401  (registers the NEPA Auto classes)
from nepa_hf.classification_data import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    check_labels,
    collate_image_batch,
    encode_labels,
    with_image_transform,
)
from nepa_hf.data import load_image_dataset, resolve_column
from nepa_hf.evaluation import (
    POOLINGS,
    classification_accuracy,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
)
from nepa_hf.transforms import INTERPOLATIONS, ImageProcessorTransform, evaluation_image_processor

TASKS = ("accuracy", "knn", "linear_probe", "all")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name", required=True, help="Hub id, image folder, or fashion_mnist/bundled.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--task", action="append", choices=TASKS, help="Repeatable; default: all that apply.")
    parser.add_argument("--train_split", default="train", help="Feature bank / probe training split.")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--label_column", default=None)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None, help="Default: the model's config.image_size.")
    parser.add_argument("--crop_pct", type=float, default=0.875, help="1.0: resize straight to the size.")
    parser.add_argument("--interpolation", default="bicubic", choices=INTERPOLATIONS)
    parser.add_argument("--pooling", default="mean", choices=POOLINGS)
    parser.add_argument("--layer", type=int, default=None, help="Block whose output to pool (default: final).")
    parser.add_argument("--is_causal", choices=("config", "true", "false"), default="config",
                        help="Attention for feature extraction (default: as the checkpoint's config).")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--probe_epochs", type=int, default=100)
    parser.add_argument("--probe_learning_rate", type=float, default=1e-2)
    parser.add_argument("--probe_weight_decay", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_file", default=None, help="Write the results as JSON here.")
    return parser.parse_args(argv)


def load_labeled_split(args, split, class_names=None, max_samples=None):
    kwargs = {"name": args.dataset_config_name} if args.dataset_config_name else {}
    dataset = load_image_dataset(args.dataset_name, split=split, max_samples=max_samples, seed=args.seed, **kwargs)
    image_column = resolve_column(dataset, args.image_column, IMAGE_COLUMN_CANDIDATES, "image")
    label_column = resolve_column(dataset, args.label_column, LABEL_COLUMN_CANDIDATES, "label")
    dataset, names = encode_labels(dataset, label_column, class_names)
    check_labels(dataset, label_column, len(names), split)
    return dataset, image_column, label_column, names


def batches(dataset, image_column, label_column, transform, args, desc):
    with_image_transform(dataset, transform, image_column, label_column)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_image_batch)
    return tqdm(loader, desc=desc, leave=False)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    is_classifier = any(a.endswith("ForImageClassification") for a in (config.architectures or []))
    tasks = set(args.task or ["all"])
    if "all" in tasks:
        tasks = {"knn", "linear_probe"} | ({"accuracy"} if is_classifier else set())
    if "accuracy" in tasks and not is_classifier:
        raise ValueError(f"{args.model_name_or_path} has no classification head: use --task knn / linear_probe.")

    try:
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        mean, std = processor.image_mean, processor.image_std
    except (OSError, ValueError):
        mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    size = args.image_size or config.image_size
    transform = ImageProcessorTransform(
        evaluation_image_processor(size, mean, std, crop_pct=args.crop_pct, interpolation=args.interpolation)
    )

    eval_set, image_column, label_column, names = load_labeled_split(args, args.eval_split,
                                                                     max_samples=args.max_eval_samples)
    results = {"model": args.model_name_or_path, "dataset": args.dataset_name, "eval_split": args.eval_split,
               "num_eval": len(eval_set), "image_size": size}
    start = time.time()

    if "accuracy" in tasks:
        model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path).to(args.device)
        if model.config.num_labels != len(names):
            raise ValueError(f"The classifier has {model.config.num_labels} labels, the dataset {len(names)}.")
        data = batches(eval_set, image_column, label_column, transform, args, "accuracy")
        results.update({f"eval_{k}": v for k, v in classification_accuracy(model, data).items()})

    if tasks & {"knn", "linear_probe"}:
        backbone = AutoModel.from_pretrained(args.model_name_or_path).to(args.device)
        is_causal = None if args.is_causal == "config" else args.is_causal == "true"
        train_set, train_image_column, train_label_column, _ = load_labeled_split(
            args, args.train_split, class_names=names, max_samples=args.max_train_samples
        )
        feature_kwargs = dict(pooling=args.pooling, layer=args.layer, is_causal=is_causal)
        train_features, train_labels = extract_features(
            backbone, batches(train_set, train_image_column, train_label_column, transform, args, "train features"),
            **feature_kwargs,
        )
        eval_features, eval_labels = extract_features(
            backbone, batches(eval_set, image_column, label_column, transform, args, "eval features"), **feature_kwargs
        )
        results.update({"num_train": len(train_features), "pooling": args.pooling, "layer": args.layer,
                        "is_causal": backbone.config.is_causal if is_causal is None else is_causal})
        if "knn" in tasks:
            knn = knn_accuracy(train_features, train_labels, eval_features, eval_labels, k=args.k,
                               temperature=args.temperature, num_classes=len(names))
            results.update({f"knn_{k}": v for k, v in knn.items()})
        if "linear_probe" in tasks:
            probe = linear_probe_accuracy(train_features, train_labels, eval_features, eval_labels,
                                          num_classes=len(names), epochs=args.probe_epochs,
                                          learning_rate=args.probe_learning_rate,
                                          weight_decay=args.probe_weight_decay, seed=args.seed)
            results.update({f"linear_probe_{k}": v for k, v in probe.items()})

    results["seconds"] = round(time.time() - start, 1)
    for key, value in results.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.output_file:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_file)), exist_ok=True)
        with open(args.output_file, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
