"""Segmenter size and training speed by backbone: the decode/auxiliary head channels derived from `hidden_size`
(the default: `hidden_size` and `hidden_size // 3`) against the former fixed 512/256, side by side in one run.

    python benchmarks/segmentation_head_size.py [--steps 3] [--batch_size 8]

Per backbone preset (micro at its 32 px, tiny and ViT-B at 112 px to keep a CPU run short), it builds
`NepaForSemanticSegmentation` with 10 classes, counts parameters, and times `--steps` training steps (forward, loss,
backward, AdamW) after one warm-up step on random images. Prints a Markdown table.
"""

import argparse
import time

import torch

from nepa_hf import NepaConfig, NepaForSemanticSegmentation

BACKBONES = {"nepa-vit-micro": 32, "nepa-vit-tiny": 112, "nepa-vit-b": 112}
HEADS = {"derived (default)": {}, "fixed 512/256 (before)": {"decode_hidden_size": 512, "auxiliary_hidden_size": 256}}


def seconds_per_step(model, image_size: int, batch_size: int, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, model.config.num_labels, (batch_size, image_size, image_size))
    model.train()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        model(pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch_size}, {args.steps} timed steps\n")
    print("| backbone | image | head channels (decode / auxiliary) | backbone params | segmenter params | s/step |")
    print("|---|---|---|---|---|---|")
    for preset, image_size in BACKBONES.items():
        for head, channels in HEADS.items():
            config = NepaConfig.from_preset(preset, image_size=image_size, num_labels=10, **channels)
            model = NepaForSemanticSegmentation(config)
            backbone = sum(p.numel() for p in model.nepa.parameters())
            total = sum(p.numel() for p in model.parameters())
            step = seconds_per_step(model, image_size, args.batch_size, args.steps)
            print(f"| {preset} | {image_size} | {head}: {config.decode_hidden_size} / {config.auxiliary_hidden_size} "
                  f"| {backbone / 1e6:.2f}M | {total / 1e6:.2f}M | {step:.2f} |", flush=True)


if __name__ == "__main__":
    main()
