"""nepa_hf.training.long_runs: the preemption signal, the non-finite guard and the per-step agreement of the
processes (here in one process and, through `torchrun`, in two)."""

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from nepa_hf.training.long_runs import (
    DEFAULT_MAX_NONFINITE_STEPS,
    PREEMPTED_EXIT_CODE,
    NonFiniteGuard,
    NonFiniteTrainingError,
    PreemptionSignal,
    agreed_flags,
    nonfinite_step,
    parse_signal_names,
)

REPO = Path(__file__).resolve().parents[1]


def test_preemption_signal_records_the_first_signal_and_restores_the_handlers():
    previous = signal.getsignal(signal.SIGUSR1)
    with PreemptionSignal(("SIGTERM", "SIGUSR1")) as preemption:
        assert not preemption.requested and preemption.received is None
        os.kill(os.getpid(), signal.SIGUSR1)  # the process is not terminated: the handler only records it
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested and preemption.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert PREEMPTED_EXIT_CODE == 75


def test_signal_names_are_validated_and_none_disables():
    assert parse_signal_names("SIGTERM, usr1") == ("SIGTERM", "SIGUSR1")
    assert parse_signal_names("none") == () and parse_signal_names("") == ()
    with pytest.raises(ValueError, match="Unknown signal name 'SIGBOGUS'.*'none'"):
        parse_signal_names("SIGTERM,SIGBOGUS")
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        PreemptionSignal(("SIGKILL",))
    with pytest.raises(TypeError, match="parse_signal_names"):
        PreemptionSignal("SIGTERM")
    disabled = PreemptionSignal(())
    assert not disabled.requested
    disabled.restore()


def test_non_finite_guard_counts_resets_and_stops_naming_the_checkpoint():
    guard = NonFiniteGuard(max_consecutive=3)
    for step, finite in enumerate([False, False, True, False, False], start=1):
        guard.update(finite, step, last_checkpoint=None)
    assert (guard.skipped, guard.consecutive) == (4, 2)
    restored = NonFiniteGuard(3)
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(NonFiniteTrainingError, match=r"Step 6: 3 optimizer steps in a row.*5 in all.*"
                       r"last good checkpoint is out/checkpoints/checkpoint_2.*Check the data"):
        restored.update(False, 6, "out/checkpoints/checkpoint_2")
    with pytest.raises(NonFiniteTrainingError, match="no checkpoint yet"):
        NonFiniteGuard(1).update(False, 1, None)
    with pytest.raises(ValueError, match="at least 1"):
        NonFiniteGuard(0)
    assert issubclass(NonFiniteTrainingError, RuntimeError) and DEFAULT_MAX_NONFINITE_STEPS == 5


def test_agreed_flags_in_one_process_takes_bools_and_tensors():
    accelerator = Accelerator(cpu=True)
    loss = torch.tensor(float("nan"))
    assert agreed_flags(accelerator, ~torch.isfinite(loss), False, True) == [True, False, True]
    assert agreed_flags(accelerator, torch.tensor(False)) == [False]


def test_nonfinite_step_reads_the_loss_and_the_grad_norm_without_a_host_sync():
    fp32 = SimpleNamespace(device=torch.device("cpu"), scaler=None)
    finite, nan, inf = torch.tensor(0.5), torch.tensor(float("nan")), torch.tensor(float("inf"))
    flag = nonfinite_step(fp32, finite, finite)
    assert isinstance(flag, torch.Tensor) and flag.shape == () and not flag
    assert nonfinite_step(fp32, nan, finite) and nonfinite_step(fp32, finite, inf)
    assert not nonfinite_step(fp32, finite, None)  # DeepSpeed may report no norm
    fp16 = SimpleNamespace(device=torch.device("cpu"), scaler=object())  # the GradScaler skips overflows itself
    assert not nonfinite_step(fp16, finite, inf) and nonfinite_step(fp16, inf, finite)


AGREEMENT_SCRIPT = """
import errno, sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from nepa_hf.training.checkpointing import CheckpointSaveError, list_checkpoints, save_checkpoint
from nepa_hf.training.long_runs import agreed_flags

project_dir = Path(sys.argv[1])
accelerator = Accelerator(cpu=True, project_config=ProjectConfiguration(project_dir=str(project_dir),
                                                                        automatic_checkpoint_naming=True))
rank = accelerator.process_index
# rank 1 alone sees a non-finite loss, rank 0 alone a signal: both ranks must decide [True, True], and [False, False]
assert agreed_flags(accelerator, torch.tensor(rank == 1), rank == 0) == [True, True]
assert agreed_flags(accelerator, torch.tensor(False), False) == [False, False]
sys.stdout.write(f"agreed {rank}\\n")  # one write per line: the ranks share the pipe
sys.stdout.flush()

# A save that fails on rank 1 only (its disk is full once its part is written): both ranks stop, none hangs.
model = accelerator.prepare(torch.nn.Linear(2, 2))
save_checkpoint(accelerator, 1)
real_save_state = accelerator.save_state

def save_state_then_full_disk(*args, **kwargs):
    real_save_state(*args, **kwargs)
    raise OSError(errno.ENOSPC, "No space left on device")

if rank == 1:
    accelerator.save_state = save_state_then_full_disk
try:
    save_checkpoint(accelerator, 2)
except CheckpointSaveError as error:
    sys.stdout.write(f"rank {rank} stopped: {error}\\n")
    sys.stdout.flush()
assert [path.name for _, path in list_checkpoints(project_dir / "checkpoints")] == ["checkpoint_0"]
assert not (project_dir / ".checkpoint-staging").exists()
"""


@pytest.mark.slow
def test_two_processes_agree_on_flags_and_on_a_save_that_failed_on_one(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(textwrap.dedent(AGREEMENT_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "agreed 0" in result.stdout and "agreed 1" in result.stdout
    assert "rank 0 stopped: Another process could not write checkpoint" in result.stdout
    assert re.search(r"rank 1 stopped: Could not write .*checkpoint_1 \(OSError: \[Errno 28\] No space left on device\); "
                     r"[\d.]+ GiB free there\. The previous checkpoints are intact", result.stdout), result.stdout
