"""Minimal NEPA pretraining on the *unlabelled* Fashion-MNIST scenes (in-domain self-supervision), CPU.

Next-embedding prediction (causal, stop-gradient, negative cosine) on the training scenes' images only (their masks
are never read), with random resized crops and flips. The result is a `NepaForPreTraining` checkpoint to fine-tune
with `examples/finetune_segmentation.py --model_name_or_path OUT`, as in benchmarks/segmentation_fashion_scenes.sh.

    python benchmarks/pretrain_nepa_on_scenes.py --output_dir outputs/bench_seg/pretrained-scenes --steps 300
"""

import argparse
import time

import numpy as np
import torch
from PIL import Image

from transformers import get_cosine_schedule_with_warmup

from nepa_hf import NepaConfig, NepaForPreTraining, NepaImageProcessorPil
from nepa_hf.training.optimization import create_pretraining_optimizer
from nepa_hf.data.segmentation import make_fashion_scenes
from nepa_hf.data.transforms import pretraining_transform, seeded


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


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, _ = make_fashion_scenes(
        args.num_scenes, split="train", image_size=args.scene_size, items_per_scene=tuple(args.scene_items),
        item_size=tuple(args.scene_item_size), seed=args.seed,
    )
    scenes = [Image.fromarray(image) for image in images]
    processor = NepaImageProcessorPil(size={"height": args.scene_size, "width": args.scene_size})
    # The reference pretraining augmentation, with a milder minimum scale for 32-pixel scenes.
    augment = pretraining_transform(args.scene_size, processor.image_mean, processor.image_std, scale=(0.35, 1.0))
    if args.init_from:
        model = NepaForPreTraining.from_pretrained(args.init_from)
    else:
        model = NepaForPreTraining(NepaConfig.from_preset("nepa-vit-micro", image_size=args.scene_size))
    optimizer = create_pretraining_optimizer(model, args.learning_rate, weight_decay=0.05)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    model.train()
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        picks = torch.randint(len(scenes), (args.batch_size,), generator=generator).tolist()
        with seeded(int(torch.randint(2**31, (1,), generator=generator))):
            batch = torch.stack([augment(scenes[i]) for i in picks])
        loss = model(batch).loss
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
