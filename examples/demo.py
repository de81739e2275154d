"""NEPA end to end on bundled real data, on a CPU, in a couple of minutes.

1. pretrain a micro NEPA (next-embedding prediction, causal) on bundled Fashion-MNIST images, labels unused;
2. fine-tune it (bidirectional) for classification, and a from-scratch twin with the same budget;
3. save in transformers format and run `pipeline("image-classification")` and
   `pipeline("image-feature-extraction")` on the bundled photos.

Run: `bash scripts/run_demo.sh` (or `python examples/demo.py --output_dir outputs/demo`).
"""

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from nepa_hf import NepaConfig, NepaForImageClassification, NepaForPreTraining, NepaImageProcessorPil
from nepa_hf.data import FASHION_MNIST_CLASSES, bundled_photo_paths, load_fashion_mnist


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--pretrain_steps", type=int, default=200)
    parser.add_argument("--finetune_steps", type=int, default=150)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def to_pixels(processor, images: np.ndarray) -> torch.Tensor:
    return processor([Image.fromarray(img).convert("RGB") for img in images], return_tensors="pt").pixel_values


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    for _ in range(steps):
        yield torch.randint(0, num_items, (batch_size,), generator=generator)


def train(model, pixels, labels, steps, batch_size, lr, seed, desc):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for step, index in enumerate(batches(len(pixels), batch_size, steps, generator), start=1):
        inputs = {"pixel_values": pixels[index]}
        if labels is not None:
            inputs["labels"] = labels[index]
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps:
            print(f"  {desc} step {step:4d}/{steps}  loss {np.mean(losses[-50:]):+.4f}")
    return losses


@torch.no_grad()
def accuracy(model, pixels, labels) -> float:
    model.eval()
    predictions = torch.cat([model(pixel_values=chunk).logits.argmax(-1) for chunk in pixels.split(256)])
    return (predictions == labels).float().mean().item()


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    processor = NepaImageProcessorPil(size={"height": 32, "width": 32})
    train_images, train_labels = load_fashion_mnist("train", source="bundled")
    test_images, test_labels = load_fashion_mnist("test", source="bundled")
    train_pixels, test_pixels = to_pixels(processor, train_images), to_pixels(processor, test_images)
    train_labels, test_labels = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    print(f"Data: {len(train_pixels)} train / {len(test_pixels)} test bundled Fashion-MNIST images")

    print("1. NEPA pretraining (causal next-embedding prediction, no labels)")
    config = NepaConfig.from_preset("nepa-vit-micro")
    pretrain = NepaForPreTraining(config)
    train(pretrain, train_pixels, None, args.pretrain_steps, args.batch_size, 1e-3, args.seed, "pretrain")
    pretrained_dir = os.path.join(args.output_dir, "pretrained")
    pretrain.save_pretrained(pretrained_dir)
    processor.save_pretrained(pretrained_dir)

    print("2. Fine-tuning for classification: NEPA-pretrained vs from scratch, same budget")
    label_kwargs = dict(
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={name: i for i, name in enumerate(FASHION_MNIST_CLASSES)},
    )
    results = {}
    for name in ("nepa", "scratch"):
        torch.manual_seed(args.seed)
        if name == "nepa":
            model = NepaForImageClassification.from_pretrained(pretrained_dir, **label_kwargs)
        else:
            model = NepaForImageClassification(NepaConfig.from_preset("nepa-vit-micro", is_causal=False, **label_kwargs))
        train(model, train_pixels, train_labels, args.finetune_steps, args.batch_size, 1e-3, args.seed, name)
        results[name] = accuracy(model, test_pixels, test_labels)
        if name == "nepa":
            classifier_dir = os.path.join(args.output_dir, "classifier")
            model.save_pretrained(classifier_dir)
            processor.save_pretrained(classifier_dir)
    for name, value in results.items():
        print(f"  test accuracy ({name}): {value:.3f}")

    print("3. Pipelines on the bundled photos")
    classify = pipeline("image-classification", model=classifier_dir)
    extract = pipeline("image-feature-extraction", model=classifier_dir)
    for path in bundled_photo_paths():
        top = classify(str(path), top_k=1)[0]
        features = extract(str(path), pool=True, return_tensors=True)
        print(f"  {path.name:28s} -> {top['label']:12s} ({top['score']:.2f}); pooled feature {tuple(features.shape)}")
    print(f"Saved: {pretrained_dir} (pretrained), {classifier_dir} (classifier). Took {time.time() - start:.0f}s.")


if __name__ == "__main__":
    main()
