"""Launching an example script in 2 CPU processes (gloo), shared by the DDP, FSDP2 and DeepSpeed tests."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "examples" / "accelerate_configs"


def launch_two_cpu_processes(script, args, accelerate_config=None, expect_success=True) -> subprocess.CompletedProcess:
    """`script` in 2 CPU processes over gloo, one thread each: DDP through `torchrun`, or, given one of the committed
    examples/accelerate_configs/*.yaml, FSDP2 or DeepSpeed through `accelerate launch` (by way of
    tests/accelerate_sharding_on_cpu.py, which lifts Accelerate's GPU-only guard for them: see its docstring)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",  # output kept if torchrun stops a process
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if accelerate_config:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                    "--num_processes", "2", "--main_process_port", "0", "--mixed_precision", "no",
                    str(REPO / "tests" / "accelerate_sharding_on_cpu.py")]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*launcher, str(script), *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=600)
    if expect_success:
        assert result.returncode == 0, result.stderr[-4000:]
    return result
