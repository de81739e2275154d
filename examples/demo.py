"""NEPA end to end, offline, on bundled real data, in a few minutes on a CPU.

1. Pretrain a micro NEPA (causal next-embedding prediction, no labels) on the bundled Fashion-MNIST images with
   `examples/pretrain_nepa.py` (Accelerate);
2. fine-tune it for classification with `examples/finetune_classification.py` (Trainer), and the same architecture
   from scratch with the same budget; print both test accuracies;
3. classify the bundled photos with `pipeline("image-classification")` and extract features with
   `pipeline("image-feature-extraction")` from the saved transformers-format model;
4. write attention / next-embedding similarity / PCA maps and the loss curves as PNGs, and print where all is.

Each step runs the same script a user would run (the exact command is printed), so the demo doubles as a guide.
Run: `bash scripts/run_demo.sh` (or `python examples/demo.py --output_dir outputs/demo`).
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

import nepa_hf  # noqa: F401  (registers the "nepa" model type)
from nepa_hf.data.images import FASHION_MNIST_CLASSES, bundled_photo_paths, load_fashion_mnist
from nepa_hf.evaluation.visualization import save_visualizations

EXAMPLES = Path(__file__).resolve().parent


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per step (default: all cores)")
    return parser.parse_args()


def run_example(script: str, arguments: list[str], threads: int | None) -> None:
    """Run one of the example scripts as a user would, printing the command first."""
    command = [sys.executable, str(EXAMPLES / script), *arguments]
    print("$ " + shlex.join(["python", f"examples/{script}", *arguments]), flush=True)
    environment = dict(os.environ)
    if threads:
        environment["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(command, check=True, env=environment)


def finetune_arguments(source: list[str], output_dir: str, args) -> list[str]:
    # Same budget and recipe for both runs; the light recipe (crop + flip: no RandAugment, colour jitter, erasing,
    # Mixup or CutMix) suits a few hundred steps.
    return [
        *source, "--dataset_name", "bundled", "--eval_split", "test", "--output_dir", output_dir,
        "--do_train", "--do_eval", "--max_steps", str(args.finetune_steps),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "250",
        "--learning_rate", "1e-3", "--ema_decay", "0.99", "--rand_augment", "none", "--color_jitter", "0",
        "--random_erasing_prob", "0",
        "--mixup_alpha", "0", "--cutmix_alpha", "0", "--save_strategy", "no", "--logging_steps", "10",
        "--report_to", "none", "--use_cpu", "true", "--seed", str(args.seed),
    ]


def plot_losses(pretrain_dir: str, finetune_dirs: dict[str, str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    with open(os.path.join(pretrain_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = [row for row in rows if "loss" in row and "step" in row]
    left.plot([row["step"] for row in rows], [row["loss"] for row in rows], color="tab:purple")
    left.set(title="NEPA pretraining (negative cosine)", xlabel="step", ylabel="loss")
    for name, directory in finetune_dirs.items():
        with open(os.path.join(directory, "trainer_state.json")) as handle:
            history = [entry for entry in json.load(handle)["log_history"] if "loss" in entry]
        right.plot([entry["step"] for entry in history], [entry["loss"] for entry in history], label=name)
    right.set(title="Fine-tuning (cross-entropy)", xlabel="step", ylabel="loss")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main():
    args = parse_args()
    start = time.time()
    out = args.output_dir
    pretrained_dir = os.path.join(out, "pretrained")
    runs = {"NEPA-pretrained": os.path.join(out, "classifier-nepa"), "from scratch": os.path.join(out, "classifier-scratch")}

    print("\n== 1. NEPA pretraining on the bundled Fashion-MNIST images (labels unused)", flush=True)
    run_example("pretrain_nepa.py", [
        "--model", "nepa-vit-micro", "--dataset", "bundled", "--output_dir", pretrained_dir,
        "--max_steps", str(args.pretrain_steps), "--per_device_batch_size", str(args.batch_size),
        "--base_learning_rate", "3e-3", "--warmup_ratio", "0.05", "--crop_min_scale", "0.5",
        "--logging_steps", "10", "--seed", str(args.seed), "--overwrite_output_dir",
    ], args.threads)

    print("\n== 2. Fine-tuning with Trainer: NEPA-pretrained vs from scratch, same budget", flush=True)
    run_example("finetune_classification.py",
                finetune_arguments(["--model_name_or_path", pretrained_dir], runs["NEPA-pretrained"], args), args.threads)
    run_example("finetune_classification.py",
                finetune_arguments(["--preset", "nepa-vit-micro"], runs["from scratch"], args), args.threads)
    accuracies = {}
    for name, directory in runs.items():
        with open(os.path.join(directory, "all_results.json")) as handle:
            accuracies[name] = json.load(handle)["eval_accuracy"]

    print("\n== 3. Pipelines on the saved model", flush=True)
    classifier_dir = runs["NEPA-pretrained"]
    classify = pipeline("image-classification", model=classifier_dir)
    extract = pipeline("image-feature-extraction", model=classifier_dir)
    test_images, test_labels = load_fashion_mnist("test", source="bundled")
    items = [Image.fromarray(image).convert("RGB") for image in test_images[:5]]
    for image, label in zip(items, test_labels[:5]):
        top = classify(image, top_k=1)[0]
        print(f"  Fashion-MNIST test item ({FASHION_MNIST_CLASSES[label]:11s}) -> {top['label']:11s} ({top['score']:.2f})")
    for path in bundled_photo_paths():
        top = classify(str(path), top_k=1)[0]
        features = extract(str(path), pool=True, return_tensors=True)
        print(f"  photo {path.name:26s} -> {top['label']:11s} ({top['score']:.2f}), pooled features "
              f"{tuple(features.shape)}  (the classes are clothes: photos show the pipeline, not accuracy)")

    print("\n== 4. Visualisations and loss curves", flush=True)
    visual_dir = os.path.join(out, "visualizations")
    backbone = AutoModel.from_pretrained(pretrained_dir, attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(pretrained_dir)
    model_name = f"{pretrained_dir} (demo NEPA, {args.pretrain_steps} steps)"
    written = save_visualizations(
        backbone, processor, items[0], visual_dir, prefix="fashion_item_", model_name=model_name,
        image_name=f"Fashion-MNIST test item 0 ({FASHION_MNIST_CLASSES[test_labels[0]]})",
    )
    # The model was pretrained at 32x32; RoPE lets it run on a photo at 64x64 (16x16 patches) for a finer map.
    photo_processor = AutoImageProcessor.from_pretrained(pretrained_dir, size={"height": 64, "width": 64})
    with Image.open(bundled_photo_paths()[0]) as photo:
        written.update({f"photo {k}": v for k, v in save_visualizations(
            backbone, photo_processor, photo, visual_dir, prefix="photo_", model_name=model_name,
        ).items()})
    loss_plot = os.path.join(out, "loss_curves.png")
    plot_losses(pretrained_dir, runs, loss_plot)

    print("\n== Results")
    for name, accuracy in accuracies.items():
        print(f"  test accuracy, {name:16s}: {accuracy:.3f}  ({args.finetune_steps} fine-tuning steps, 1000 test images)")
    print(f"  pretrained model : {pretrained_dir}  (AutoModel / AutoModelForPreTraining.from_pretrained)")
    print(f"  classifier       : {classifier_dir}  (pipeline('image-classification', model=...))")
    print(f"  loss curves      : {loss_plot}")
    for name, path in written.items():
        print(f"  {name:17s}: {path}")
    print(f"Done in {time.time() - start:.0f}s.")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
