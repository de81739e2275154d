#!/usr/bin/env python
"""A prepared GPU check: CUDA correctness checks plus ViT-B/14 bf16 training and inference throughput, one table.

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.json

On a CUDA GPU (sized for one H100/H200, under 8 minutes) it prints one markdown table with
  * checks run on `cuda` (in-script, not the pytest suite, which pins the CPU): sdpa vs eager parity in bf16,
    causality of the pretraining attention, forward+backward of NepaForPreTraining and NepaForImageClassification
    under bf16 autocast;
  * a pretraining step (forward + backward + AdamW, bf16 autocast) of NepaForPreTraining (`nepa-vit-b`, ViT-B/14 at
    224) and of transformers' ViTModel at equal dims (objective: mean of last_hidden_state squared), with sdpa,
    flash_attention_2 if `flash_attn` is importable, and sdpa under `torch.compile`: images/s (median, min-max over
    the timed iterations), MFU (FlopCounterMode FLOPs of one eager sdpa step / step time / the GPU's bf16 dense
    peak) and peak memory (`torch.cuda.max_memory_allocated`);
  * an inference row per model (bf16 autocast, no grad).
Without a GPU it says so and runs the same code on a tiny config on the CPU (a smoke run, `torch.compile` with the
"eager" backend so it stays quick), so the script itself is exercised. Every row is guarded: a missing optional
package, an OOM or an error becomes a "skipped"/"error" note instead of ending the run. The exit status is 1 only if
a check fails.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from transformers import ViTConfig, ViTModel  # noqa: E402

from nepa_hf import NepaConfig, NepaForImageClassification, NepaForPreTraining, NepaModel  # noqa: E402

# bf16 dense peak FLOP/s by device name (first match wins, so the specific names come first).
BF16_PEAKS = [
    ("H200", 989e12),  # same GH100 chip as the H100 SXM
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
]
NO_GPU_LINE = "No CUDA GPU present: running the CPU smoke path (tiny config, 2 iterations); numbers are not benchmarks."


@dataclass
class Setup:
    device: str
    dims: dict  # hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, patch_size, image_size
    train_batch: int
    infer_batch: int
    warmup: int
    iters: int
    compile_backend: str


GPU_SETUP = dict(
    dims=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=14,
              image_size=224),
    train_batch=128, infer_batch=256, warmup=3, iters=10, compile_backend="inductor",
)  # fmt: skip
CPU_SETUP = dict(
    dims=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, patch_size=8,
              image_size=32),
    train_batch=2, infer_batch=2, warmup=1, iters=2, compile_backend="eager",
)  # fmt: skip


@dataclass
class Row:
    section: str
    model: str
    attention: str = "-"
    compiled: str = "-"
    batch: int | str = "-"
    images_per_s: float | None = None
    spread: str = ""
    tflop_per_step: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------- helpers


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAKS:
        if key.lower() in device_name.lower():
            return peak
    return None


def autocast(device: str):
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@functools.cache
def throughput_benchmark():
    """benchmarks/throughput.py as a module (loaded once), for the FLOP counter both benchmarks share."""
    spec = importlib.util.spec_from_file_location("nepa_throughput_benchmark", Path(__file__).with_name("throughput.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    return module


def flop_counter():
    """The throughput benchmark's FLOP counter (torch's FlopCounterMode + the CPU flash-attention ops)."""
    return throughput_benchmark().flop_counter()


def nepa_config(setup: Setup, **overrides) -> NepaConfig:
    # The preset is ViT-B/14 at 224; the CPU smoke run shrinks it through the same call.
    return NepaConfig.from_preset("nepa-vit-b", **{**setup.dims, **overrides})


def vit_model(setup: Setup) -> ViTModel:
    d = setup.dims
    config = ViTConfig(
        hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        patch_size=d["patch_size"], image_size=d["image_size"], qkv_bias=True,
    )  # fmt: skip
    return ViTModel(config, add_pooling_layer=False)


def build(family: str, setup: Setup, attention: str, training: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "NEPA":
        model = NepaForPreTraining(nepa_config(setup)) if training else NepaModel(nepa_config(setup))
    else:
        model = vit_model(setup)
    model.set_attn_implementation(attention)
    return model.to(setup.device).train(training)


def objective(family: str, model, pixels):
    if family == "NEPA":
        return model(pixels).loss
    return model(pixels).last_hidden_state.float().pow(2).mean()


def time_iterations(fn, setup: Setup) -> list[float]:
    for _ in range(setup.warmup):
        fn()
    synchronize(setup.device)
    times = []
    for _ in range(setup.iters):
        start = time.perf_counter()
        fn()
        synchronize(setup.device)
        times.append(time.perf_counter() - start)
    return times


def fill_rate(row: Row, times: list[float], batch: int, flops: float | None, peak: float | None) -> None:
    rates = [batch / t for t in times]
    row.images_per_s = statistics.median(rates)
    row.spread = f"{min(rates):.0f}-{max(rates):.0f}" if max(rates) >= 10 else f"{min(rates):.2f}-{max(rates):.2f}"
    if flops:
        row.tflop_per_step = flops / 1e12
        if peak:
            row.mfu = flops / statistics.median(times) / peak


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def guarded(row: Row, fn, device: str) -> Row:
    try:
        fn(row)
    except torch.cuda.OutOfMemoryError as error:  # noqa: PERF203
        row.note = f"error: OOM ({str(error).splitlines()[0][:80]})"
    except Exception as error:  # a row's failure is reported, never fatal
        row.note = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
    finally:
        free(device)
    return row


# ----------------------------------------------------------------------------------------------------------- checks


def check_rows(setup: Setup) -> list[Row]:
    device = setup.device
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, patch_size=8,
                 image_size=64)  # fmt: skip
    rows = []

    def parity(row):
        torch.manual_seed(0)
        model = NepaModel(NepaConfig.from_preset("nepa-vit-b", **small)).to(device).eval()
        pixels = torch.randn(4, 3, 64, 64, device=device)
        outputs = {}
        for attention in ("eager", "sdpa"):
            model.set_attn_implementation(attention)
            with torch.no_grad(), autocast(device):
                outputs[attention] = model(pixels).last_hidden_state.float()
        error = (outputs["eager"] - outputs["sdpa"]).abs().max().item() / outputs["eager"].abs().max().item()
        ok = error < 3e-2
        row.note = f"{'PASS' if ok else 'FAIL'}: max abs(eager - sdpa) / max abs(eager) = {error:.2e} (bf16, tol 3e-2)"

    def causality(row):
        torch.manual_seed(0)
        model = NepaModel(NepaConfig.from_preset("nepa-vit-b", **small)).to(device).eval()
        model.set_attn_implementation("sdpa")
        pixels = torch.randn(2, 3, 64, 64, device=device)
        changed = pixels.clone()
        changed[:, :, -8:, -8:] += 1.0  # the last patch only
        with torch.no_grad():
            a, b = (model(x, is_causal=True).last_hidden_state for x in (pixels, changed))
        before = (a[:, :-1] - b[:, :-1]).abs().max().item()
        last = (a[:, -1] - b[:, -1]).abs().max().item()
        ok = before < 1e-4 and last > 1e-3
        row.note = f"{'PASS' if ok else 'FAIL'}: earlier tokens moved {before:.1e}, last token {last:.1e} (fp32 sdpa)"

    def train_both(row):
        notes, ok = [], True
        for cls in (NepaForPreTraining, NepaForImageClassification):
            torch.manual_seed(0)
            config = NepaConfig.from_preset("nepa-vit-b", **small, num_labels=10)
            model = cls(config).to(device).train()
            model.set_attn_implementation("sdpa")
            pixels = torch.randn(4, 3, 64, 64, device=device)
            kwargs = {"labels": torch.randint(0, 10, (4,), device=device)} if cls is NepaForImageClassification else {}
            with autocast(device):
                loss = model(pixels, **kwargs).loss
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            finite = torch.isfinite(loss).item() and all(g is not None and torch.isfinite(g).all().item() for g in grads)
            ok &= finite
            notes.append(f"{cls.__name__.removeprefix('NepaFor')} loss {loss.item():.3f}")
        row.note = f"{'PASS' if ok else 'FAIL'}: finite loss and grads; " + ", ".join(notes)

    for name, fn in [
        ("sdpa vs eager parity", parity),
        ("causal attention", causality),
        ("fwd+bwd PreTraining & Classification", train_both),
    ]:
        rows.append(guarded(Row("check", name, note=""), fn, device))
        if rows[-1].note.startswith("error"):
            rows[-1].note = "FAIL (" + rows[-1].note + ")"
    return rows


# ----------------------------------------------------------------------------------------------------- benchmarks


def benchmark_rows(setup: Setup, peak: float | None, deadline: float, compile_limit_s: float) -> list[Row]:
    device, rows = setup.device, []
    attentions = ["sdpa"]
    if importlib.util.find_spec("flash_attn") is not None:
        attentions.append("flash_attention_2")
    image = setup.dims["image_size"]
    compile_skipped: str | None = "--no-compile" if compile_limit_s < 0 else None

    for family in ("NEPA", "ViT"):
        # FLOPs of one eager sdpa training step (the same math for the other attention kernels and under compile).
        flops = {}

        def count(row, family=family):
            model = build(family, setup, "sdpa", training=True)
            pixels = torch.randn(setup.train_batch, 3, image, image, device=device)
            with flop_counter() as counter, autocast(device):
                objective(family, model, pixels).backward()
            flops["train"] = counter.get_total_flops()
            model.eval()
            with flop_counter() as counter, torch.no_grad(), autocast(device):
                (model.nepa if family == "NEPA" else model)(
                    torch.randn(setup.infer_batch, 3, image, image, device=device)
                )
            flops["infer"] = counter.get_total_flops()

        counted = guarded(Row("flops", family), count, device)
        label = "NEPA (NepaForPreTraining)" if family == "NEPA" else "ViT (ViTModel)"

        variants = [(attention, False) for attention in attentions] + [("sdpa", True)]
        for attention, use_compile in variants:
            row = Row("train step", label, attention, "yes" if use_compile else "no", setup.train_batch)
            if counted.note:
                row.extra["flop_count"] = counted.note
            if time.monotonic() > deadline:
                row.note = "skipped: time budget spent"
                rows.append(row)
                continue
            if use_compile and not compile_skipped and time.monotonic() + compile_limit_s > deadline:
                compile_skipped = f"less than {compile_limit_s:.0f} s of the time budget left to compile"
            if use_compile and compile_skipped:
                row.note = f"skipped: {compile_skipped}"
                rows.append(row)
                continue

            def train(row, family=family, attention=attention, use_compile=use_compile):
                nonlocal compile_skipped
                model = build(family, setup, attention, training=True)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
                forward = torch.compile(model, backend=setup.compile_backend) if use_compile else model
                pixels = torch.randn(setup.train_batch, 3, image, image, device=device)

                def step():
                    with autocast(device):
                        loss = objective(family, forward, pixels)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                if use_compile:
                    start = time.perf_counter()
                    step()
                    synchronize(device)
                    compile_s = time.perf_counter() - start
                    row.extra["first_compiled_step_s"] = round(compile_s, 1)
                    if compile_s > compile_limit_s:
                        compile_skipped = f"first compile took {compile_s:.0f} s > {compile_limit_s:.0f} s"
                        row.note = f"skipped: {compile_skipped}"
                        return
                    row.note = f"first compiled step {compile_s:.0f} s ({setup.compile_backend})"
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                fill_rate(row, time_iterations(step, setup), setup.train_batch, flops.get("train"), peak)
                if device == "cuda":
                    row.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30

            rows.append(guarded(row, train, device))

        def infer(row, family=family):
            model = build(family, setup, "sdpa", training=False)
            pixels = torch.randn(setup.infer_batch, 3, image, image, device=device)

            def forward():
                with torch.no_grad(), autocast(device):
                    model(pixels)

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fill_rate(row, time_iterations(forward, setup), setup.infer_batch, flops.get("infer"), peak)
            if device == "cuda":
                row.peak_memory_gib = torch.cuda.max_memory_allocated() / 2**30

        row = Row("inference", "NEPA (NepaModel)" if family == "NEPA" else "ViT (ViTModel)", "sdpa", "no",
                  setup.infer_batch)  # fmt: skip
        if time.monotonic() > deadline:
            row.note = "skipped: time budget spent"
            rows.append(row)
        else:
            rows.append(guarded(row, infer, device))
    return rows


# ---------------------------------------------------------------------------------------------------------- report


def markdown_table(rows: list[Row]) -> str:
    def number(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        "| section | model / check | attention | compile | batch | images/s (median) | min-max | TFLOP/step | MFU "
        "| peak mem GiB | result / note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rate = "-" if r.images_per_s is None else (f"{r.images_per_s:.0f}" if r.images_per_s >= 10 else f"{r.images_per_s:.2f}")
        lines.append(
            f"| {r.section} | {r.model} | {r.attention} | {r.compiled} | {r.batch} | {rate} | {r.spread or '-'} "
            f"| {number(r.tflop_per_step, '.4g')} | {number(None if r.mfu is None else 100 * r.mfu, '.1f')}"
            f"{'%' if r.mfu is not None else ''} | {number(r.peak_memory_gib, '.2f')} | {r.note or '-'} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="also write the rows and the table to this JSON file")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no row after this many seconds (the run stays under 8 min)")
    parser.add_argument("--compile-limit-s", type=float, default=120.0, help="skip compile rows if compiling is slower")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--cpu", action="store_true", help="take the CPU smoke path even if a GPU is present")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        device_name = torch.cuda.get_device_name(0)
        setup = Setup(device="cuda", **GPU_SETUP)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        header = f"GPU check on {device_name} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    else:
        device_name = "cpu"
        setup = Setup(device="cpu", **CPU_SETUP)
        header = NO_GPU_LINE
    print(header, flush=True)
    peak = bf16_peak(device_name) if cuda else None
    peak_line = f"bf16 dense peak: {peak / 1e12:.0f} TFLOP/s" if peak else f"bf16 dense peak: unknown peak ({device_name})"
    print(peak_line, flush=True)

    rows = check_rows(setup)
    rows += benchmark_rows(setup, peak, started + args.budget_s, -1.0 if args.no_compile else args.compile_limit_s)
    table = markdown_table(rows)
    title = "CPU smoke run (tiny config; not a benchmark)" if not cuda else f"{device_name}, ViT-B/14 at 224, bf16 autocast"
    elapsed = time.monotonic() - started
    print(f"\n### gpu_check: {title}\n\n{table}\n\n(total {elapsed:.0f} s)", flush=True)

    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        payload = dict(
            header=header, device=device_name, cuda=cuda, bf16_peak_flops=peak, setup=asdict(setup),
            torch=torch.__version__, elapsed_s=round(elapsed, 1), rows=[asdict(r) for r in rows], markdown=table,
        )  # fmt: skip
        Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    failed = [r for r in rows if r.section == "check" and not r.note.startswith("PASS")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
