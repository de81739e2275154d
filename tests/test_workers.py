"""The default number of DataLoader workers: one rule (nepa_hf.data.workers) for every script; explicit values win."""

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser

from nepa_hf.data import workers
from nepa_hf.data.workers import default_num_workers
from nepa_hf.training import finetuning
from nepa_hf.training.finetuning import AutoWorkersTrainingArguments, NepaTrainingArguments

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def sixteen_cores(monkeypatch):
    monkeypatch.setattr(workers, "available_cores", lambda: 16)


def test_workers_on_an_accelerator_and_none_on_a_cpu(sixteen_cores):
    assert default_num_workers("cpu") == 0 and default_num_workers(torch.device("cpu"), num_processes=4) == 0
    assert default_num_workers("cuda") == 12  # capped: 16 cores
    assert default_num_workers(torch.device("cuda", 3), num_processes=4) == 4  # the cores shared by 4 processes
    assert default_num_workers("cuda", num_processes=32) == 1  # at least one, even with more processes than cores
    assert default_num_workers("mps") == 12 and default_num_workers("cuda", max_workers=2) == 2
    with pytest.raises(ValueError, match="num_processes must be >= 1"):
        default_num_workers("cuda", num_processes=0)


def test_available_cores_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert workers.available_cores() == 3  # e.g. `taskset -c 0,2,5`, not the machine's count


def test_training_arguments_default_by_device_and_explicit_values_win(tmp_path, monkeypatch):
    # This machine has no GPU: the default is 0 workers, the CPU rule.
    assert AutoWorkersTrainingArguments(output_dir=str(tmp_path), report_to="none").dataloader_num_workers == 0
    calls = []

    def recorded_rule(device, num_processes):
        calls.append((torch.device(device).type, num_processes))
        return 5

    monkeypatch.setattr(finetuning, "default_num_workers", recorded_rule)
    parser = HfArgumentParser(NepaTrainingArguments)  # the fine-tuning script's arguments inherit the rule
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none"])
    assert args.dataloader_num_workers == 5 and calls == [("cpu", 1)]  # the rule, asked with the device
    for explicit in ("0", "3"):  # a number given, 0 included, is kept
        (args,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--report_to", "none", "--dataloader_num_workers", explicit])
        assert args.dataloader_num_workers == int(explicit)
    assert len(calls) == 1


def test_evaluation_script_uses_the_rule_for_its_device(sixteen_cores):
    spec = importlib.util.spec_from_file_location("evaluate_nepa_example", REPO / "examples" / "evaluate_nepa.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    required = ["--model_name_or_path", "unused", "--dataset_name", "bundled"]
    assert script.parse_args(required + ["--device", "cpu"]).num_workers == 0
    assert script.parse_args(required + ["--device", "cuda"]).num_workers == 12  # parsing alone needs no GPU
    assert script.parse_args(required + ["--device", "cuda", "--num_workers", "0"]).num_workers == 0
