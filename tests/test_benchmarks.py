"""Smoke tests of the throughput benchmark's helpers on a tiny config (the benchmark itself is not part of the suite)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("nepa_throughput_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The benchmark sets torch's thread count (`--threads`, the memory worker): give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_interleaved_timings_rotate_the_order(bench):
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = bench.interleaved_timings(cases, repeats=3, warmup=1)
    assert {name: len(values) for name, values in timings.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")


@pytest.mark.parametrize("family", ["vit", "nepa"])
def test_flop_counter_counts_attention_and_matches_the_analytic_count(bench, family):
    size = bench.SIZES["tiny"]
    model = (bench.build_vit(size) if family == "vit" else bench.build_nepa(size)).eval()
    with torch.inference_mode():
        counted = bench.count_flops(lambda: model(torch.randn(1, 3, size.image_size, size.image_size)))
    assert counted == sum(bench.analytic_forward_flops(size).values())


def test_memory_helpers_on_a_training_step(bench):
    size = bench.SIZES["tiny"]
    model = bench.build_nepa(size).train()
    optimizer = bench.make_optimizer(model)
    pixels = torch.randn(4, 3, size.image_size, size.image_size)
    step = bench._train_step_fn(model, pixels, optimizer, "nepa")
    step()
    saved = bench.saved_activation_bytes(model, lambda: model(pixels).last_hidden_state)
    peak = bench.profiled_step_peak_bytes(model, optimizer, step)
    gradients = sum(p.numel() * 4 for p in model.parameters())
    # The step's peak holds at least the saved activations, and later all the gradients.
    assert peak >= max(saved, gradients) > 0


def test_input_pipelines_produce_model_inputs(bench):
    pipelines = bench.input_pipelines(32)
    assert set(pipelines) == {"pretraining", "fine-tuning", "evaluation"}
    image = Image.new("RGB", (64, 48), (200, 100, 50))
    for name, pipeline in pipelines.items():
        sample = pipeline["sample"](image)  # what a DataLoader worker hands the model: normalised floats
        assert sample.dtype == torch.float32 and sample.shape == (3, 32, 32), name
        assert -1.0 - 1e-6 <= sample.min() and sample.max() <= 1.0 + 1e-6 or name == "fine-tuning", name


def test_quick_style_run_writes_the_headline_keys(bench, tmp_path):
    output = tmp_path / "throughput.json"
    args = bench.parse_args(
        [
            "--quick", "--sizes", "tiny", "--batch-sizes", "2", "--sections", "peak,inference",
            "--peak-square-sizes", "64", "--repeats", "1", "--threads", "1", "--output", str(output),
        ]
    )
    results = bench.run(args)
    assert 0 < results["inference_ratio_vs_vit"] < 100
    assert 0 < results["inference_peak_fraction"]
    markdown = bench.markdown_report(results)
    assert "NEPA / ViT inference images/s" in markdown and "| tiny | 17 | 2 | nepa |" in markdown
    json.dumps(results)  # serialisable


def test_paired_ratio_range_compares_within_each_round(bench):
    timings = {"vit": [1.0, 2.0, 1.5], "nepa": [2.0, 2.0, 1.0]}
    assert bench.paired_ratio_range(timings, "nepa") == [0.5, 1.5]
    assert bench.paired_ratio_range(timings, "vit") == [1.0, 1.0]


@pytest.mark.slow
def test_training_rows_for_every_size_and_workers_for_a_target_rate(bench, tmp_path):
    args = bench.parse_args(
        [
            "--quick", "--sizes", "tiny,tiny-p4", "--train-batch-sizes", "2", "--sections", "train,data,compile",
            "--train-repeats", "2", "--data-samples", "3", "--threads", "1", "--target-images-per-s", "1000",
            "--causal-rows", "--output", str(tmp_path / "throughput.json"),
        ]
    )
    results = bench.run(args)
    train = [r for r in results["rows"] if r["section"] == "train"]
    # Every size gets ViT and NEPA; the extra rows (the pretraining model) only the first size.
    assert sorted((r["size"], r["model"]) for r in train) == [
        ("tiny", "nepa"), ("tiny", "nepa-pretraining"), ("tiny", "vit"), ("tiny-p4", "nepa"), ("tiny-p4", "vit")
    ]
    assert set(results["by_size"]) == {"tiny", "tiny-p4"}
    rows = {(r["size"], r["model"]): r for r in train}
    for size, entry in results["by_size"].items():
        low, high = entry["train_ratio_vs_vit_range"]
        assert 0 < low <= high
        nepa, vit = rows[(size, "nepa")], rows[(size, "vit")]
        assert entry["train_memory_ratio_vs_vit"] == pytest.approx(nepa["tensor_peak_mib"] / vit["tensor_peak_mib"])
    assert not any(r["section"] == "compile" for r in results["rows"])  # --quick compiles nothing
    data = [r for r in results["rows"] if r["section"] == "data"]
    assert data and all(r["model_images_per_s"] == rows[("tiny", "nepa")]["images_per_s"] for r in data
                        if r["pipeline"] != "evaluation")
    for row in data:
        assert row["workers_for_target"] == -(-1000 // row["images_per_s_per_worker"])
    markdown = bench.markdown_report(results)
    assert "| tiny-p4: NEPA / ViT training images/s |" in markdown and "workers for 1,000 images/s" in markdown


@pytest.mark.slow
def test_compile_section_compares_both_families_compiled(bench, tmp_path):
    args = bench.parse_args(
        [
            "--quick", "--compile", "--sizes", "tiny", "--sections", "compile", "--compile-batch", "2", "--compile-train-batch", "2",
            "--repeats", "2", "--train-repeats", "2", "--threads", "1", "--output", str(tmp_path / "throughput.json"),
        ]
    )
    results = bench.run(args)
    rows = {(r["mode"], r["variant"]): r for r in results["rows"] if r["section"] == "compile"}
    assert set(rows) == {(mode, variant) for mode in ("inference", "train")
                         for variant in ("vit", "vit +compile", "nepa", "nepa +compile")}
    assert all("error" not in r for r in rows.values()), rows
    for mode in ("inference", "train"):
        compiled = rows[(mode, "nepa +compile")]
        assert results[f"compile_{mode}_ratio_vs_vit"] == compiled["ratio_vs_vit_same_mode"] > 0
        assert rows[(mode, "vit +compile")]["ratio_vs_vit_same_mode"] == 1.0
    # Training rows carry the peak memory of each variant, measured in its own process (compiled ones compiled).
    train = {variant: rows[("train", variant)] for variant in ("vit", "vit +compile", "nepa", "nepa +compile")}
    assert all(r["tensor_peak_mib"] > 0 for r in train.values())
    assert results["compile_train_memory_ratio_vs_vit"] == pytest.approx(
        train["nepa +compile"]["tensor_peak_mib"] / train["vit +compile"]["tensor_peak_mib"])
    assert "memory_ratio_vs_vit_same_mode" not in rows[("inference", "nepa +compile")]
    assert "NEPA / ViT training images/s, both under torch.compile" in bench.markdown_report(results)


def test_memory_worker_compiles_when_asked(bench):
    spec = {"family": "nepa", "size": "tiny", "batch": 2, "threads": 1, "steps": 2}
    eager = bench.memory_worker({**spec, "compiled": False})
    assert eager["saved_activations_mib"] > 0 and eager["tensor_peak_mib"] > 0
    torch._dynamo.reset()
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = bench.memory_worker({**spec, "compiled": True})
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiled_before  # it really ran compiled
    assert compiled["saved_activations_mib"] is None and compiled["tensor_peak_mib"] > 0


def test_gpu_check_cpu_path_prints_the_table(tmp_path, capsys, monkeypatch):
    """benchmarks/gpu_check.py without a GPU: says so, runs its tiny CPU path through the same code, exits 0."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("nepa_gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    output = tmp_path / "gpu_check.json"
    assert module.main(["--cpu", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA GPU present" in printed and "CPU smoke run" in printed
    assert "| train step | NEPA (NepaForPreTraining) | sdpa | no |" in printed
    assert "| train step | ViT (ViTModel) | sdpa | no |" in printed
    assert "| inference | NEPA (NepaModel) |" in printed and "| inference | ViT (ViTModel) |" in printed
    results = json.loads(output.read_text())
    assert not results["cuda"] and all(r["note"].startswith("PASS") for r in results["rows"] if r["section"] == "check")
    assert all(r["images_per_s"] for r in results["rows"] if r["section"] in ("train step", "inference"))
    assert all(r["tflop_per_step"] for r in results["rows"] if r["section"] in ("train step", "inference"))
