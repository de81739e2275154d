"""Evaluate NEPA models on an image-classification dataset.

* `--task accuracy`: top-1/top-5 accuracy of a fine-tuned classifier (the reference evaluation transform: resize
  the short side to size / crop_pct, centre crop).
* `--task knn` / `--task linear_probe`: frozen-backbone evaluation of any NEPA checkpoint (pretraining or
  fine-tuned): pooled features of the training and evaluation splits, then a weighted k-NN (k=20, T=0.07) and/or
  a logistic-regression probe. The quick way to compare pretrained backbones without fine-tuning.
* `--task all`: everything that applies to the checkpoint.

Evaluation data: --eval_split (default "test", else "validation"). A dataset with neither, e.g. a plain image folder,
is evaluated on a class-stratified hold-out of --train_split, the one examples/finetune_classification.py holds out:
its fraction and seed come from the model's `data_split.json` when the fine-tuning script wrote one (which also
tells when the model trained on the whole split, which is then refused), else from --validation_fraction and --seed.
The k-NN bank and the probe then train on the rest. The output says which images were scored.

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
from nepa_hf.data.classification import (
    IMAGE_COLUMN_CANDIDATES,
    LABEL_COLUMN_CANDIDATES,
    check_labels,
    collate_image_batch,
    encode_labels,
    model_class_order,
    remap_labels,
    train_validation_split,
    with_image_transform,
)
from nepa_hf.data.images import load_image_dataset, resolve_column, split_names
from nepa_hf.evaluation.features import (
    POOLINGS,
    classification_accuracy,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
)
from nepa_hf.hub.loading import load_pretrained
from nepa_hf.data.transforms import INTERPOLATIONS, ImageProcessorTransform, evaluation_image_processor
from nepa_hf.data.workers import default_num_workers

TASKS = ("accuracy", "knn", "linear_probe", "all")
DATA_SPLIT_FILE = "data_split.json"  # written by examples/finetune_classification.py beside the model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name", required=True, help="Hub id, image folder, or fashion_mnist/bundled.")
    parser.add_argument("--dataset_config_name", default=None)
    parser.add_argument("--task", action="append", choices=TASKS, help="Repeatable; default: all that apply.")
    parser.add_argument("--train_split", default="train", help="Feature bank / probe training split.")
    parser.add_argument("--eval_split", default=None,
                        help="Default: 'test', else 'validation', else a stratified hold-out of --train_split.")
    parser.add_argument("--validation_fraction", type=float, default=0.1,
                        help="Hold-out fraction per class when there is no evaluation split (as in fine-tuning; "
                             "a fine-tuned model's data_split.json wins).")
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
    parser.add_argument("--num_workers", type=int, default=None,
                        help="DataLoader workers (default: min(12, cores) on a GPU, 0 on a CPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_file", default=None, help="Write the results as JSON here.")
    args = parser.parse_args(argv)
    if args.num_workers is None:
        args.num_workers = default_num_workers(args.device)
    return args


def load_kwargs(args) -> dict:
    return {"name": args.dataset_config_name} if args.dataset_config_name else {}


def subsample(dataset, max_samples, seed):
    if max_samples is not None and max_samples < len(dataset):
        return dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset


def read_data_split(model_name_or_path):
    """The fine-tuning script's record of what it trained and evaluated on, or None."""
    path = os.path.join(model_name_or_path, DATA_SPLIT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def evaluation_split(args):
    """--eval_split, else 'test', else 'validation' when the dataset has them; None: hold out part of --train_split."""
    available = split_names(args.dataset_name, **load_kwargs(args))
    if args.eval_split is not None and args.eval_split not in available:
        raise ValueError(
            f"--eval_split {args.eval_split!r}: {args.dataset_name} has the splits {available}. Leave --eval_split "
            f"out to evaluate on a stratified hold-out of --train_split {args.train_split!r}."
        )
    return args.eval_split or next((name for name in ("test", "validation") if name in available), None)


def hold_out(args, train_set, label_column):
    """(held-out evaluation set, the rest, description): a class-stratified hold-out of the training split, with the
    fraction and seed the fine-tuning script used when the model's data_split.json says so. Refuses when the model
    was fine-tuned on the whole split: its accuracy there is training-set accuracy."""
    fraction, seed = args.validation_fraction, args.seed
    record = read_data_split(args.model_name_or_path)
    same_data = record is not None and (record.get("dataset"), record.get("train_split")) == (
        args.dataset_name, args.train_split)
    if same_data and record.get("eval") != "held_out":
        raise ValueError(
            f"{args.dataset_name} has no 'test' or 'validation' split, and {args.model_name_or_path} was fine-tuned "
            f"on all of its {args.train_split!r} split ({DATA_SPLIT_FILE}): a hold-out of it would score training "
            "images. Pass --eval_split with a split the model did not train on."
        )
    if same_data:
        fraction, seed = record["validation_fraction"], record["seed"]
        origin = f"the images the model was fine-tuned without, per its {DATA_SPLIT_FILE}"
    else:
        origin = ("--validation_fraction and --seed; the model has no record of its fine-tuning data here, so make "
                  "sure it did not train on these images")
    rest, held_out = train_validation_split(train_set, label_column, fraction, seed=seed)
    description = (f"a stratified hold-out of {fraction:.0%} of every class of the {args.train_split!r} split (seed "
                   f"{seed}: {origin})")
    print(f"No 'test' or 'validation' split in {args.dataset_name}: evaluating on {description}. k-NN and probe "
          f"features come from the other {len(rest)} images.")
    return held_out, rest, description


def prepare(dataset, args, class_names, max_samples, split):
    """(dataset with integer labels, image column, label column), subsampled and checked."""
    image_column = resolve_column(dataset, args.image_column, IMAGE_COLUMN_CANDIDATES, "image")
    label_column = resolve_column(dataset, args.label_column, LABEL_COLUMN_CANDIDATES, "label")
    dataset, _ = encode_labels(dataset, label_column, class_names)
    dataset = subsample(dataset, max_samples, args.seed)
    check_labels(dataset, label_column, len(class_names), split)
    return dataset, image_column, label_column


def batches(dataset, image_column, label_column, transform, args, desc):
    """(normalised batches, the `UnreadableImages` record of the images skipped as unreadable)."""
    images = with_image_transform(dataset, transform, image_column, label_column)
    loader = DataLoader(images, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_image_batch)
    return tqdm(loader, desc=desc, leave=False), images.unreadable


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

    # The class set comes from the training split when it is needed anyway, else from the evaluation split
    # (ClassLabel names, or the labels present; see encode_labels).
    eval_split = evaluation_split(args)
    train_set = names = None
    if eval_split is None or tasks & {"knn", "linear_probe"}:
        train_set = load_image_dataset(args.dataset_name, split=args.train_split, **load_kwargs(args))
        train_label_column = resolve_column(train_set, args.label_column, LABEL_COLUMN_CANDIDATES, "label")
        train_set, names = encode_labels(train_set, train_label_column)
    if eval_split is None:
        eval_set, train_set, eval_description = hold_out(args, train_set, train_label_column)
        eval_split = f"{args.train_split} (held out)"
    else:
        eval_set = load_image_dataset(args.dataset_name, split=eval_split, **load_kwargs(args))
        eval_description = f"the {eval_split!r} split"
        if names is None:
            eval_label_column = resolve_column(eval_set, args.label_column, LABEL_COLUMN_CANDIDATES, "label")
            _, names = encode_labels(eval_set, eval_label_column)
    eval_set, image_column, label_column = prepare(eval_set, args, names, args.max_eval_samples, eval_split)
    results = {"model": args.model_name_or_path, "dataset": args.dataset_name, "eval_split": eval_split,
               "eval_images": eval_description, "num_eval": len(eval_set), "image_size": size}
    start = time.time()

    unreadable = {}
    if "accuracy" in tasks:
        model = load_pretrained(AutoModelForImageClassification, args.model_name_or_path).to(args.device)
        # Classes are matched by name: the same classes in another order (e.g. a folder's alphabetical ones) are
        # remapped to the model's ids, other classes refused.
        model_order = model_class_order(names, model.config.id2label, args.model_name_or_path)
        scored = eval_set if model_order is None else remap_labels(eval_set, label_column, names, model_order)
        data, skipped = batches(scored, image_column, label_column, transform, args, "accuracy")
        results.update({f"eval_{k}": v for k, v in classification_accuracy(model, data).items()})
        unreadable["eval"] = skipped.count()

    if tasks & {"knn", "linear_probe"}:
        backbone = load_pretrained(AutoModel, args.model_name_or_path).to(args.device)
        is_causal = None if args.is_causal == "config" else args.is_causal == "true"
        train_set, train_image_column, train_label_column = prepare(train_set, args, names, args.max_train_samples,
                                                                    args.train_split)
        feature_kwargs = dict(pooling=args.pooling, layer=args.layer, is_causal=is_causal)
        train_data, train_skipped = batches(train_set, train_image_column, train_label_column, transform, args,
                                            "train features")
        train_features, train_labels = extract_features(backbone, train_data, **feature_kwargs)
        eval_data, eval_skipped = batches(eval_set, image_column, label_column, transform, args, "eval features")
        eval_features, eval_labels = extract_features(backbone, eval_data, **feature_kwargs)
        unreadable.update(train=train_skipped.count(), eval=eval_skipped.count())
        results.update({"num_train": len(train_features), "pooling": args.pooling, "layer": args.layer,
                        "is_causal": backbone.config.resolved_is_causal if is_causal is None else is_causal})
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

    results.update({f"{split}_unreadable_images": count for split, count in unreadable.items()})
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
