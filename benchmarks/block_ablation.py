# Copyright 2026 The nepa-hf authors. Licensed under the Apache License, Version 2.0.
"""One NEPA block against one transformers ViT block (and another revision's NEPA block), timed side by side.

    python benchmarks/block_ablation.py                 # ViT-B dims, batch 16, 197 tokens, 1 thread
    python benchmarks/block_ablation.py --threads 2 --batch 32 --baseline-src /tmp/base/src

One transformer block (not the whole model) of transformers' ViT and of NEPA, at equal dims and token count, timed
interleaved in one process. By default with one thread and process CPU time, which other load on a shared machine
barely disturbs (wall time is reported too). With --baseline-src, the block of another checkout (e.g. before a
change) runs in the same rounds with the same weights. Also reports the bytes autograd saves for backward per block.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "src") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import ViTConfig  # noqa: E402
from transformers.models.vit.modeling_vit import ViTLayer  # noqa: E402

import nepa_hf.models.nepa.modeling_nepa as modeling  # noqa: E402
from throughput import SIZES, load_baseline_package, nepa_config, saved_activation_bytes  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit-b16", choices=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--mode", choices=["inference", "train", "both"], default="both")
    parser.add_argument("--qk-norm-affine", action="store_true", help="affine QK-norm (fine-tuned checkpoints)")
    parser.add_argument("--baseline-src", default=None, help="another revision's src/ (see throughput.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    tokens = size.tokens()
    torch.manual_seed(0)
    vit_config = ViTConfig(
        hidden_size=size.hidden_size, num_attention_heads=size.num_heads, intermediate_size=size.mlp_size,
        layer_norm_eps=1e-12,
    )
    vit_config._attn_implementation = "sdpa"
    config = nepa_config(size, qk_norm_affine=args.qk_norm_affine)
    config._attn_implementation = "sdpa"
    blocks = {"vit": ViTLayer(vit_config), "nepa": modeling.NepaLayer(config)}
    if args.baseline_src:
        baseline = load_baseline_package(args.baseline_src)
        baseline_config = baseline.NepaConfig(**config.to_diff_dict())
        baseline_config._attn_implementation = "sdpa"
        blocks["baseline revision"] = sys.modules["nepa_hf_baseline.modeling_nepa"].NepaLayer(baseline_config)
        blocks["baseline revision"].load_state_dict(blocks["nepa"].state_dict())
    grid = size.image_size // size.patch_size
    rope = modeling.NepaRopePositionEmbedding(config).eval()
    cos, sin = rope(grid, grid, torch.device("cpu"), torch.float32)
    hidden = torch.randn(args.batch, tokens, size.hidden_size)

    def call(name, block, train):
        kwargs = {}
        if name != "vit":
            kwargs = dict(position_embeddings=(cos, sin), is_causal=False)
        if train:
            block.train()
            inputs = hidden.clone().requires_grad_()
            block(inputs, **kwargs).square().mean().backward()
            block.zero_grad(set_to_none=True)
        else:
            block.eval()
            with torch.inference_mode():
                block(hidden, **kwargs)

    modes = ["inference", "train"] if args.mode == "both" else [args.mode]
    print(
        f"{args.size}: one block, batch {args.batch}, {tokens} tokens, {args.threads} thread(s), "
        f"QK-norm {'affine' if args.qk_norm_affine else 'non-affine'}, {args.repeats} interleaved repetitions\n"
    )
    for mode in modes:
        train = mode == "train"
        cases = dict(blocks)
        cpu = {name: [] for name in cases}
        wall = {name: [] for name in cases}
        names = list(cases)
        for name in names:  # warm-up
            call(name, cases[name], train)
        for round_index in range(args.repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                cpu_start, start = time.process_time(), time.perf_counter()
                call(name, cases[name], train)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu_start)
        saved = {}
        if train:
            for name, block in cases.items():
                block.train()
                kwargs = {} if name == "vit" else dict(position_embeddings=(cos, sin), is_causal=False)
                saved[name] = saved_activation_bytes(block, lambda b=block, k=kwargs: b(hidden.clone().requires_grad_(), **k))
        vit_cpu, vit_wall = statistics.median(cpu["vit"]), statistics.median(wall["vit"])
        print(f"### {'forward + backward' if train else 'inference forward'}\n")
        header = "| block | CPU ms (median) | CPU ms (min) | speed vs ViT (CPU) | wall ms | speed vs ViT (wall) |"
        header += " saved for backward MiB |" if train else ""
        print(header)
        print("|---" * (header.count("|") - 1) + "|")
        for name in names:
            c, w = statistics.median(cpu[name]), statistics.median(wall[name])
            line = (
                f"| {name} | {c * 1e3:.1f} | {min(cpu[name]) * 1e3:.1f} | {vit_cpu / c:.3f} | {w * 1e3:.1f} | "
                f"{vit_wall / w:.3f} |"
            )
            if train:
                line += f" {saved[name] / 2**20:.1f} |"
            print(line)
        print()


if __name__ == "__main__":
    main()
