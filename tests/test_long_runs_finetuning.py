"""Issue 27, fine-tuning side: examples/finetune_classification.py survives preemption and non-finite steps
(`nepa_hf.training.trainer_callbacks.LongRunCallback`, added by `NepaTrainer`).

Faults are injected into the real script: `inject_faults` patches `NepaTrainer.compute_loss` (in-process through
pytest's monkeypatch; under torchrun this file runs as a script, reading the faults from the environment, see the
end). Steps are numbered as the Trainer's checkpoints: step s ends with `global_step == s`.
"""

import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch_processes import launch_two_cpu_processes
from nepa_hf.training.long_runs import PREEMPTED_EXIT_CODE, NonFiniteTrainingError

REPO = Path(__file__).resolve().parents[1]

SMALL = "hidden_size=32,num_hidden_layers=1,intermediate_size=64,image_size=28,patch_size=7"


def run_args(output_dir, *extra) -> list[str]:
    """64 bundled images, batch 8: 8 steps per epoch, so every run here stops and resumes mid-epoch. The default
    recipe (RandAugment, Mixup, EMA, layer decay); `--resume_from_checkpoint latest` from the first run on, as a
    preemptible job script would pass it."""
    return ["--preset", "nepa-vit-micro", "--config_overrides", SMALL, "--dataset_name", "bundled",
            "--output_dir", str(output_dir), "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
            "--seed", "0", "--do_train", "--max_train_samples", "64", "--per_device_train_batch_size", "8",
            "--logging_steps", "1", "--save_strategy", "no", "--ema_decay", "0.9",
            "--resume_from_checkpoint", "latest", *extra]


def inject_faults(setattr, sigterm_step=None, nan_loss_steps=(), inf_loss_steps=(), rank=0,
                  fixed_transform=False) -> None:
    """On the process of rank `rank`: SIGTERM to itself during `sigterm_step`; a NaN loss (so NaN gradients) on
    `nan_loss_steps`; a +inf loss whose gradients stay finite on `inf_loss_steps`. `fixed_transform`: training
    images get the evaluation preprocessing, whose fetch draws no random numbers (see the resume test)."""
    from nepa_hf.data.augmentation import AugmentationArguments
    from nepa_hf.data.transforms import ImageProcessorTransform
    from nepa_hf.training.finetuning import NepaTrainer

    compute_loss = NepaTrainer.compute_loss

    def faulty_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        step = self.state.global_step + 1
        if not model.training or self.args.process_index != rank:
            return result
        loss = result[0] if return_outputs else result
        if step == sigterm_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if step in nan_loss_steps:
            loss = loss * float("nan")
        if step in inf_loss_steps:
            loss = loss + float("inf")  # a constant: the gradients stay finite
        return (loss, *result[1:]) if return_outputs else loss

    setattr(NepaTrainer, "compute_loss", faulty_compute_loss)
    if fixed_transform:
        setattr(AugmentationArguments, "train_transform",
                lambda self, size, mean, std: ImageProcessorTransform(self.eval_image_processor(size, mean, std)))


def load_finetune_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_finetune_classification",
                                                  REPO / "examples" / "finetune_classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finetune_script():
    return load_finetune_script()


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    differing = {k: (first[k] - second[k]).abs().max().item() for k in first if not torch.equal(first[k], second[k])}
    assert not differing, differing


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_sigterm_mid_epoch_saves_that_step_exits_75_and_resume_equals_an_uninterrupted_run(
        tmp_path, finetune_script, monkeypatch, single_thread, caplog):
    """SIGTERM during step 3 of 6: the step finishes, checkpoint-3 is written (EMA included), the script exits with
    75 and writes no final model; the same command resumes and ends with the uninterrupted run's weights and EMA,
    bit for bit. The training images get a fixed preprocessing: with the random recipe, accelerate's DataLoader
    fetches one batch ahead, so the batch after a checkpoint was augmented with random numbers drawn before the
    checkpoint's RNG states, which a resumed run cannot replay (measured: max |dw| 1.4e-3 after 3 steps)."""
    previous_handler = signal.getsignal(signal.SIGTERM)
    args = ["--max_steps", "6", "--mixup_alpha", "0", "--cutmix_alpha", "0"]
    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, fixed_transform=True)
        finetune_script.main(run_args(tmp_path / "uninterrupted", *args))
    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, sigterm_step=3, fixed_transform=True)
        with pytest.raises(SystemExit) as stopped, caplog.at_level("WARNING"):
            finetune_script.main(run_args(tmp_path / "preempted", *args))
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 75
    assert signal.getsignal(signal.SIGTERM) is previous_handler  # the handlers are put back
    checkpoint = tmp_path / "preempted" / "checkpoint-3"
    assert f"Preempted (SIGTERM): saved {checkpoint} and stopped" in caplog.text
    assert "--resume_from_checkpoint latest" in caplog.text
    assert sorted(p.name for p in (tmp_path / "preempted").iterdir()) == ["checkpoint-3"]  # no final model
    assert trainer_state(checkpoint)["global_step"] == 3
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "ema.safetensors"} <= {
        p.name for p in checkpoint.iterdir()}

    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, fixed_transform=True)
        finetune_script.main(run_args(tmp_path / "preempted", *args))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(tmp_path / "uninterrupted" / name, tmp_path / "preempted" / name)
    assert trainer_state(tmp_path / "preempted")["global_step"] == 6


def test_a_preemption_checkpoint_survives_best_model_cleanup(tmp_path, finetune_script, monkeypatch, single_thread):
    """With load_best_model_at_end and save_total_limit=1 the Trainer deletes every checkpoint but the best at the
    end of training; a preempted run keeps the one it just wrote."""
    output_dir = tmp_path / "out"
    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, sigterm_step=3, fixed_transform=True)
        with pytest.raises(SystemExit):
            finetune_script.main(run_args(
                output_dir, "--max_steps", "6", "--do_eval", "--eval_split", "train", "--max_eval_samples", "8",
                "--eval_strategy", "steps", "--eval_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
                "--load_best_model_at_end", "--metric_for_best_model", "loss", "--save_total_limit", "1"))
    assert (output_dir / "checkpoint-3" / "model.safetensors").is_file()


def test_a_nan_step_updates_nothing_is_counted_and_the_count_survives_a_resume(
        tmp_path, finetune_script, monkeypatch, single_thread):
    """A NaN loss (NaN gradients) at step 3 of 5: step 3 moves neither the weights nor their EMA (checkpoints 2 and
    3 hold the same; step 1 has lr 0, step 2 moves both), no NaN reaches them, AdamW took 4 steps, not 5, and the
    step is counted (`nonfinite_steps` in the logs, `train_nonfinite_steps` in the results, the counts in the
    checkpoint's trainer_state.json, which a resumed run carries on from)."""
    output_dir = tmp_path / "out"
    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, nan_loss_steps=(3,))
        trainer = finetune_script.main(run_args(output_dir, "--max_steps", "5", "--save_strategy", "steps",
                                                "--save_steps", "1"))
    for name in ("model.safetensors", "ema.safetensors"):
        assert_same_weights(output_dir / "checkpoint-2" / name, output_dir / "checkpoint-3" / name)
        for step in (2, 4):  # the steps before and after update both
            assert not torch.equal(*(load_file(output_dir / f"checkpoint-{s}" / name)["classifier.bias"]
                                     for s in (step - 1, step))), (name, step)
        assert all(torch.isfinite(tensor).all() for tensor in load_file(output_dir / name).values()), name
    assert {state["step"].item() for state in trainer.optimizer.state_dict()["state"].values()} == {4.0}
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["train_nonfinite_steps"] == 1 and math.isfinite(results["train_loss"])
    logged = [entry["nonfinite_steps"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0, 0, 1, 1, 1]
    counts = trainer_state(output_dir / "checkpoint-3")["stateful_callbacks"]["LongRunCallback"]["attributes"]
    assert counts == {"nonfinite_counts": {"skipped": 1, "consecutive": 1}}

    # A run resumed from checkpoint-3 goes on counting from there.
    trainer = finetune_script.main(run_args(output_dir, "--max_steps", "5", "--resume_from_checkpoint",
                                            str(output_dir / "checkpoint-3")))
    assert trainer.long_run_callback.guard.state_dict() == {"skipped": 1, "consecutive": 0}
    assert json.loads((output_dir / "all_results.json").read_text())["train_nonfinite_steps"] == 1


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_step_and_the_last_checkpoint(
        tmp_path, finetune_script, monkeypatch, single_thread):
    """--max_nonfinite_steps 2: NaN losses at steps 3 and 4 stop the run at step 4, naming checkpoint-2 (saved
    before them, finite); the signal handlers are put back."""
    previous_handler = signal.getsignal(signal.SIGUSR1)
    output_dir = tmp_path / "out"
    with monkeypatch.context() as patch:
        inject_faults(patch.setattr, nan_loss_steps=(3, 4, 5))
        with pytest.raises(NonFiniteTrainingError, match=(
                rf"Step 4: 2 optimizer steps in a row had a non-finite loss or gradient norm and were skipped \(2 in "
                rf"all\); stopping \(the last good checkpoint is {output_dir / 'checkpoint-2'}\)\. Check the data for "
                r"corrupt or extreme inputs")):
            finetune_script.main(run_args(output_dir, "--max_steps", "6", "--save_strategy", "steps",
                                          "--save_steps", "2", "--max_nonfinite_steps", "2"))
    assert signal.getsignal(signal.SIGUSR1) is previous_handler
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for t in load_file(output_dir / "checkpoint-2" / "model.safetensors").values())


def test_bad_long_run_flags_fail_before_any_data_is_read(tmp_path, finetune_script):
    with pytest.raises(ValueError, match="Unknown signal name 'SIGFOO'"):
        finetune_script.main(run_args(tmp_path / "a", "--preemption_signals", "SIGTERM,SIGFOO"))
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        finetune_script.main(run_args(tmp_path / "a", "--preemption_signals", "SIGKILL"))
    with pytest.raises(ValueError, match="--max_nonfinite_steps must be at least 1, got 0"):
        finetune_script.main(run_args(tmp_path / "a", "--max_nonfinite_steps", "0"))
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*/nowhere: no such checkpoint folder"):
        finetune_script.main(run_args(tmp_path / "a", "--resume_from_checkpoint", str(tmp_path / "nowhere")))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_resume_equals_an_uninterrupted_run(
        tmp_path):
    """torchrun, 2 processes: SIGTERM reaches rank 0 alone during step 3, rank 1 alone gets a +inf loss (finite
    gradients) at step 2. The all-reduced flags make both processes skip step 2 and save step 3, then exit with 75
    (torchrun reports it, see below; ranks started by srun each exit with it); the resumed run ends with the
    uninterrupted run's weights (the same faults but no signal), bit for bit. Three torchrun launches: ~55 s on the
    2-core CI machine."""
    args = ["--max_steps", "5", "--per_device_train_batch_size", "4", "--mixup_alpha", "0", "--cutmix_alpha", "0",
            "--ema_decay", "0"]
    faults = {"NEPA_FAULT_INF_LOSS_STEPS": "2", "NEPA_FAULT_INF_LOSS_RANK": "1", "NEPA_FAULT_FIXED_TRANSFORM": "1"}

    def launch(output_dir, **environment):
        os.environ.update({**faults, **environment})
        try:
            return launch_two_cpu_processes(__file__, run_args(output_dir, *args), expect_success=False)
        finally:
            for name in {**faults, **environment}:
                os.environ.pop(name)

    uninterrupted = launch(tmp_path / "uninterrupted")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    preempted = launch(tmp_path / "preempted", NEPA_FAULT_SIGTERM_STEP="3", NEPA_FAULT_SIGTERM_RANK="0")
    # torchrun ends the job with status 1 and, once one process exited (75, after both wrote the checkpoint), stops
    # the other with SIGTERM; its summary lists each process's status.
    statuses = re.findall(r"exitcode\s*:\s*(-?\d+)", preempted.stderr)
    assert preempted.returncode == 1 and str(PREEMPTED_EXIT_CODE) in statuses, preempted.stderr[-3000:]
    assert set(statuses) <= {str(PREEMPTED_EXIT_CODE), str(-signal.SIGTERM)}, preempted.stderr[-3000:]
    checkpoint = tmp_path / "preempted" / "checkpoint-3"
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert trainer_state(checkpoint)["global_step"] == 3
    resumed = launch(tmp_path / "preempted")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "uninterrupted" / "model.safetensors", tmp_path / "preempted" / "model.safetensors")
    for run in ("uninterrupted", "preempted"):  # rank 0 counted rank 1's skipped step
        assert json.loads((tmp_path / run / "all_results.json").read_text())["train_nonfinite_steps"] == 1


if __name__ == "__main__":  # under torchrun (the two-process test): the faults come from the environment
    def steps(name: str) -> tuple[int, ...]:
        return tuple(int(step) for step in os.environ.get(name, "").split(",") if step)

    if os.environ.get("NEPA_FAULT_SIGTERM_STEP"):
        inject_faults(setattr, sigterm_step=int(os.environ["NEPA_FAULT_SIGTERM_STEP"]),
                      rank=int(os.environ["NEPA_FAULT_SIGTERM_RANK"]))
    inject_faults(setattr, inf_loss_steps=steps("NEPA_FAULT_INF_LOSS_STEPS"),
                  rank=int(os.environ.get("NEPA_FAULT_INF_LOSS_RANK", "0")),
                  fixed_transform=os.environ.get("NEPA_FAULT_FIXED_TRANSFORM") == "1")
    load_finetune_script().main(sys.argv[1:])
