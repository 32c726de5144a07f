"""torch.distributed and Megatron-Core parallel state: set up when the caller has not, reused when it has.

NCCL when CUDA is present, gloo otherwise (with the CPU mode switched on). Without torchrun the
process becomes a world of one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from bridge.runtime import cpu_mode

logger = logging.getLogger(__name__)


class ParallelConfigError(ValueError):
    """The requested TP/PP/VPP sizes do not fit the world or the parallel state already set up."""


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
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)  # in-process: no port to collide on
    logger.info("torch.distributed: %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes; data parallelism is whatever the world size leaves.

    ``etp`` (expert tensor parallel) defaults to ``tp``; ``ep`` splits the routed experts.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vpp", self.vpp if self.vpp and self.vpp > 1 else None)
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.vpp and self.pp == 1:
            raise ParallelConfigError("vpp > 1 needs pp > 1")

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    def check_world(self, world: int) -> None:
        if world % (self.tp * self.pp):
            raise ParallelConfigError(f"world size {world} is not divisible by tp×pp = {self.tp}×{self.pp}")
        if world % (self.expert_tp * self.ep * self.pp):
            raise ParallelConfigError(f"world size {world} is not divisible by etp×ep×pp = {self.expert_tp}×{self.ep}×{self.pp}")


def _current_sizes() -> ParallelSizes:
    return ParallelSizes(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        etp=parallel_state.get_expert_tensor_parallel_world_size(),
    )


def initialize_parallel(sizes: ParallelSizes, seed: int = 1234) -> None:
    """Make sure torch.distributed and Megatron-Core's parallel state exist with these sizes."""
    if not cpu_mode.cuda_available():
        cpu_mode.enable_cpu_mode()
    init_distributed()
    sizes.check_world(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        have = _current_sizes()
        if replace(have, etp=have.expert_tp) != replace(sizes, etp=sizes.expert_tp):
            raise ParallelConfigError(f"Megatron-Core's parallel state is already set up with {have}; asked for {sizes}")
        return
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.expert_tp,
    )
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(seed)
