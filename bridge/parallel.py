"""torch.distributed and Megatron-Core parallel state: set up when the caller has not, reused when it has.

NCCL when CUDA is present, gloo otherwise (with the CPU mode switched on). Without torchrun the
process becomes a world of one.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge import cpu_mode

logger = logging.getLogger(__name__)


class ParallelConfigError(ValueError):
    """The requested TP/PP/VPP sizes do not fit the world or the parallel state already set up."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Start torch.distributed from torchrun's environment, or as a world of one."""
    if dist.is_initialized():
        return
    cuda = cpu_mode.cuda_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    logger.info("torch.distributed: %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())


def initialize_parallel(tp: int = 1, pp: int = 1, vpp: int | None = None, seed: int = 1234) -> None:
    """Make sure torch.distributed and Megatron-Core's parallel state exist with these sizes."""
    if not cpu_mode.cuda_available():
        cpu_mode.enable_cpu_mode()
    init_distributed()
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ParallelConfigError(f"world size {world} is not divisible by tp×pp = {tp}×{pp}")
    if vpp is not None and vpp > 1 and pp == 1:
        raise ParallelConfigError("vpp > 1 needs pp > 1")
    vpp = vpp if vpp and vpp > 1 else None
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
        if have != (tp, pp, vpp):
            raise ParallelConfigError(
                f"Megatron-Core's parallel state is already set up with tp={have[0]}, pp={have[1]}, vpp={have[2]}; "
                f"asked for tp={tp}, pp={pp}, vpp={vpp}"
            )
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
