"""Run a training script under Accelerate's FSDP or DeepSpeed plugin with CPU processes (gloo), for the tests.

    accelerate launch --config_file examples/accelerate_configs/fsdp2.yaml --num_processes 2 \
        tests/accelerate_sharding_on_cpu.py examples/pretrain_nepa.py ARGS...

Accelerate 1.15 selects FSDP and DeepSpeed only on GPU-type devices. `AcceleratorState` switches to
`DistributedType.FSDP` only from MULTI_GPU/NPU/XPU/..., never from MULTI_CPU, and to DEEPSPEED only when not on the
CPU; `accelerate launch` refuses `--cpu` together with `--use_fsdp`/`--use_deepspeed`. So with `ACCELERATE_USE_CPU`
the plugin settings are silently ignored (a plain DDP run); without it, on a machine without GPUs, FSDP gives each
process a separate non-distributed run, and DeepSpeed starts its own process group while Accelerate counts one
process (no data sharding; DeepSpeed's batch-size check fails). torch's FSDP2 (`fully_shard`) and DeepSpeed
(its CPU accelerator) both run on CPU over gloo. This launcher lifts that one guard: it asks for CPU processes
(a gloo process group set up by Accelerate) and, once Accelerate has built its state as MULTI_CPU with an FSDP or a
DeepSpeed plugin (from the `accelerate launch` environment), switches the state to FSDP or DEEPSPEED, as Accelerate
does on GPUs. Everything after that is Accelerate's, torch's and DeepSpeed's real code (`fsdp2_prepare_model` /
`deepspeed.initialize`, `clip_grad_norm_`, `get_state_dict`, `save_state`).
"""

import os
import runpy
import sys

os.environ["ACCELERATE_USE_CPU"] = "true"  # CPU processes and a gloo process group, set up by Accelerate

from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_accelerator_state_init = AcceleratorState.__init__


def _switch_to(state, distributed_type):
    # Both shared states: a later bare `AcceleratorState()` copies PartialState's fields over its own.
    PartialState().distributed_type = distributed_type
    state.distributed_type = distributed_type


def _init_with_sharding_on_cpu(self, *args, deepspeed_plugin=None, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, deepspeed_plugin=deepspeed_plugin, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        _switch_to(self, DistributedType.FSDP)
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:
        import deepspeed.comm

        deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps the gloo group
        _switch_to(self, DistributedType.DEEPSPEED)
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin


AcceleratorState.__init__ = _init_with_sharding_on_cpu

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} SCRIPT [ARGS...]")
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
