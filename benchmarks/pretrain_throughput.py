#!/usr/bin/env python
"""Pretraining throughput of examples/pretrain_nepa.py: images/s and the fraction of step time spent waiting for data.

Runs the example script for a few steps per setting (a fresh output folder each), reads its `metrics.jsonl`, and
prints a markdown table: the median over the logged steps after the first (warm-up) of `images_per_s` and
`data_wait_fraction`, with the machine's load average so numbers from a shared machine can be judged.

    python benchmarks/pretrain_throughput.py                       # tiny + base presets at 224 on this machine
    python benchmarks/pretrain_throughput.py --model nepa-vit-b --batch_size 8 --mixed_precision bf16 no \
        --workers 0 2 --steps 6 --json results.json
    python benchmarks/pretrain_throughput.py --data_only --dataset bundled_photos   # what one data worker supplies
"""

import argparse
import itertools
import json
import resource
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_nepa.py"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["nepa-vit-tiny", "nepa-vit-b"])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--image_size", type=int, default=None, help="Default: the preset's (224).")
    parser.add_argument("--batch_size", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=6, help="Optimizer steps per setting (the first is warm-up).")
    parser.add_argument("--mixed_precision", nargs="+", default=["no", "bf16"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: unset).")
    parser.add_argument("--nproc", type=int, default=1, help="Processes (torchrun, ACCELERATE_USE_CPU=1 on CPU).")
    parser.add_argument("--extra", default="", help="Extra arguments for the script, as one string.")
    parser.add_argument("--json", default=None, help="Also write the results here.")
    parser.add_argument("--data_only", action="store_true",
                        help="Time only the per-sample decode + RandomResizedCrop + flip of one worker (in this "
                             "process), in images/s, at --image_size (default 224).")
    return parser.parse_args()


def data_pipeline_images_per_s(dataset_name: str, image_size: int, seconds: float = 10.0) -> float:
    """Images/s that one data worker (here: this process) decodes and crops, as the training DataLoader does."""
    import torch

    from nepa_hf.data.images import load_image_dataset
    from nepa_hf.data.pretraining import PretrainingImageDataset
    from nepa_hf.data.transforms import pretraining_transform

    torch.set_num_threads(1)
    dataset = load_image_dataset(dataset_name, max_samples=2000)
    wrapped = PretrainingImageDataset(dataset, "image", pretraining_transform(image_size, [0.5] * 3, [0.5] * 3))
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        assert wrapped[(0, count % len(wrapped))] is not None
        count += 1
    return count / (time.perf_counter() - start)


def run_one(args, model, batch_size, precision, workers):
    with tempfile.TemporaryDirectory() as output_dir:
        script_args = [
            str(SCRIPT), "--model", model, "--dataset", args.dataset, "--output_dir", output_dir,
            "--max_steps", str(args.steps), "--per_device_batch_size", str(batch_size), "--logging_steps", "1",
            "--mixed_precision", precision, "--dataloader_num_workers", str(workers), "--seed", "0",
            *(["--image_size", str(args.image_size)] if args.image_size else []), *args.extra.split(),
        ]
        if args.nproc > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                       str(args.nproc), *script_args]
        else:
            command = [sys.executable, *script_args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        if args.nproc > 1:
            env.setdefault("ACCELERATE_USE_CPU", "1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        load_before = os.getloadavg()[0]
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
        if result.returncode != 0:
            raise RuntimeError(f"{model} failed:\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]
    timed = records[1:] or records
    return {
        "model": model, "batch_size": batch_size, "nproc": args.nproc, "mixed_precision": precision,
        "workers": workers, "threads": args.threads or "default",
        "images_per_s": statistics.median(r["images_per_s"] for r in timed),
        "data_wait_fraction": statistics.median(r["data_wait_fraction"] for r in timed),
        "steps_timed": len(timed), "wall_s": wall, "load_avg_1min": (load_before + os.getloadavg()[0]) / 2,
        # CPU seconds the run got per wall second (whole run, start-up included): below the thread count when
        # the machine is shared.
        "cpu_share": cpu_seconds / wall,
    }


def main():
    args = parse_args()
    print(f"CPU cores: {os.cpu_count()}, load average at start: {os.getloadavg()}")
    if args.data_only:
        rate = data_pipeline_images_per_s(args.dataset, args.image_size or 224)
        print(f"{args.dataset}: one worker decodes + crops {rate:.0f} images/s at {args.image_size or 224}px "
              f"(load average {os.getloadavg()[0]:.1f})")
        return
    results = []
    header = "| model | batch/proc | procs | precision | workers | threads | images/s | data wait | load | cpu share |"
    print(header + "\n" + "|---" * 10 + "|")
    for model, batch_size, precision, workers in itertools.product(
            args.model, args.batch_size, args.mixed_precision, args.workers):
        result = run_one(args, model, batch_size, precision, workers)
        results.append(result)
        print(f"| {model} | {batch_size} | {args.nproc} | {precision} | {workers} | {result['threads']} | "
              f"{result['images_per_s']:.2f} | {result['data_wait_fraction']:.1%} | {result['load_avg_1min']:.1f} | "
              f"{result['cpu_share']:.2f} |",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
