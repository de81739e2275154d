"""Minimal NEPA pretraining on the *unlabelled* Fashion-MNIST scenes (in-domain self-supervision), CPU.

Next-embedding prediction (causal, stop-gradient, negative cosine) on the training scenes' images only (their masks
are never read), with random resized crops and flips. The result is a `NepaForPreTraining` checkpoint to fine-tune
with `examples/finetune_segmentation.py --model_name_or_path OUT`, as in benchmarks/segmentation_fashion_scenes.sh.

    python benchmarks/pretrain_nepa_on_scenes.py --output_dir outputs/bench_seg/pretrained-scenes --steps 300
"""

import argparse
import math
import time

import numpy as np
import torch
from PIL import Image

from nepa_hf import NepaConfig, NepaForPreTraining, NepaImageProcessorPil
from nepa_hf.segmentation_data import make_fashion_scenes


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--init_from", default=None, help="Continue from a NEPA checkpoint (e.g. the demo's).")
    parser.add_argument("--num_scenes", type=int, default=2000, help="Same scenes (seed 0) as the fine-tuning set.")
    parser.add_argument("--scene_size", type=int, default=32)
    parser.add_argument("--scene_items", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--scene_item_size", type=int, nargs=2, default=[16, 28])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def random_resized_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator) -> Image.Image:
    """RandomResizedCrop(scale 0.35-1, ratio 3/4-4/3) + horizontal flip, the reference pretraining augmentation."""
    height, width = image.shape[:2]
    for _ in range(10):
        area = height * width * rng.uniform(0.35, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_w, crop_h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            break
    else:
        crop_w, crop_h = width, height
    top, left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
    crop = Image.fromarray(image[top : top + crop_h, left : left + crop_w]).resize((size, size), Image.Resampling.BICUBIC)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    images, _ = make_fashion_scenes(
        args.num_scenes, split="train", image_size=args.scene_size, items_per_scene=tuple(args.scene_items),
        item_size=tuple(args.scene_item_size), seed=args.seed,
    )
    processor = NepaImageProcessorPil(size={"height": args.scene_size, "width": args.scene_size})
    if args.init_from:
        model = NepaForPreTraining.from_pretrained(args.init_from)
    else:
        model = NepaForPreTraining(NepaConfig.from_preset("nepa-vit-micro", image_size=args.scene_size))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith("cls_token")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith("cls_token")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95),
    )

    def lr_factor(step):  # linear warmup, then cosine to 0
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        batch = [random_resized_crop_flip(images[i], args.scene_size, rng) for i in rng.integers(len(images), size=args.batch_size)]
        loss = model(processor(batch, return_tensors="pt").pixel_values).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}/{args.steps}  loss {np.mean(losses[-25:]):+.4f}  {time.time() - start:.0f}s", flush=True)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"Saved {args.output_dir}")


if __name__ == "__main__":
    main()
