"""Megatron-Core's training engine around bridged model chunks: DDP, optimizer, LR schedule.

This is Megatron-LM's ``setup_model_and_optimizer`` for a model that came out of ``AutoBridge``:
``megatron.core.distributed.DistributedDataParallel`` around every chunk (``Float16Module`` first
in bf16/fp16), ``get_megatron_optimizer`` (Adam, optionally the distributed optimizer) and
``OptimizerParamScheduler`` in samples, exactly as Megatron-LM counts them. Nothing here
re-implements the engine: it only fills in its configs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from bridge.lora import LoraConfig, apply_lora

logger = logging.getLogger(__name__)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


class TrainingConfigError(ValueError):
    """Batch sizes, schedule or parallel layout that cannot train together."""


@dataclass
class TrainingConfig:
    """What Megatron-LM takes as training arguments; iterations count optimizer steps."""

    train_iters: int
    micro_batch_size: int = 1
    global_batch_size: int = 8
    seq_length: int = 128
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    override_opt_param_scheduler: bool = False  # True: these LR settings win over a checkpoint's
    seed: int = 1234
    log_interval: int = 1

    def __post_init__(self) -> None:
        if self.train_iters < 0:
            raise TrainingConfigError(f"train_iters must be >= 0, got {self.train_iters}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise TrainingConfigError(f"lr_decay_style must be one of {LR_DECAY_STYLES}, got {self.lr_decay_style!r}")
        if self.min_lr > self.lr:
            raise TrainingConfigError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        if self.micro_batch_size < 1 or self.global_batch_size < 1 or self.seq_length < 1:
            raise TrainingConfigError("micro_batch_size, global_batch_size and seq_length must be positive")

    @property
    def decay_iters(self) -> int:
        return max(self.lr_decay_iters or self.train_iters, self.lr_warmup_iters + 1)


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def num_microbatches(cfg: TrainingConfig, dp_size: int | None = None) -> int:
    """Micro-batches per DP rank and step: global batch = micro batch × DP × this."""
    dp_size = dp_size or data_parallel_size()
    per_step = cfg.micro_batch_size * dp_size
    if cfg.global_batch_size % per_step:
        raise TrainingConfigError(
            f"global batch size {cfg.global_batch_size} is not a multiple of micro batch size × DP = {cfg.micro_batch_size} × {dp_size}"
        )
    return cfg.global_batch_size // per_step


def check_schedule(cfg: TrainingConfig) -> None:
    """Fail before training when the interleaved schedule cannot run this many micro-batches."""
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    n = num_microbatches(cfg)
    if vpp and vpp > 1 and (n < pp or 0 < n % pp < pp):
        raise TrainingConfigError(
            f"the interleaved schedule (pp={pp}, vpp={vpp}) needs a number of micro-batches per step that is a "
            f"multiple of pp; got {n} (global batch {cfg.global_batch_size} / (micro batch {cfg.micro_batch_size} × "
            f"DP {data_parallel_size()})). Raise the global batch size or lower the micro batch size."
        )


def wrap_model(chunks: list[torch.nn.Module], cfg: TrainingConfig) -> list[DistributedDataParallel]:
    """Megatron-LM's ``get_model`` wrapping: ``Float16Module`` (bf16/fp16) then ``DistributedDataParallel``.

    Also sets the hooks the schedules call (``finalize_model_grads``) and switches the loss to
    Megatron's per-token form, so a step's loss and gradients are the mean over every token of the
    global batch whatever the TP×PP×DP layout.
    """
    config = chunks[0].config
    config.calculate_per_token_loss = True
    if config.fp16 or config.bf16:
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        overlap_param_gather=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    # Every DP replica loaded the same checkpoint, so (as in Megatron-LM without
    # --data-parallel-random-init) the parameters need no broadcast.
    config.no_sync_func = None  # grads are reduced once, in finalize_model_grads (no overlap)
    config.grad_sync_func = None
    config.param_sync_func = None
    config.finalize_model_grads_func = finalize_model_grads
    return model


def build_optimizer(model: list[DistributedDataParallel], cfg: TrainingConfig):
    """``get_megatron_optimizer`` (Adam with decoupled weight decay) and its ``OptimizerParamScheduler``.

    The scheduler counts samples like Megatron-LM (warmup and decay in iterations × global batch).
    """
    config = model[0].config
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    config.grad_scale_func = optimizer.scale_loss
    gbs = cfg.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,  # Megatron-LM's --lr-warmup-init
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * gbs,
        lr_decay_steps=cfg.decay_iters * gbs,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=cfg.decay_iters * gbs,  # unused (constant weight decay); not train_iters, which a resume may raise
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=cfg.override_opt_param_scheduler,
    )
    return optimizer, scheduler


def setup_model_and_optimizer(
    bridge,
    tp: int,
    pp: int,
    vpp: int | None,
    cfg: TrainingConfig,
    load_weights: bool = True,
    lora: LoraConfig | None = None,
    *,
    ep: int = 1,
    etp: int | None = None,
    sequence_parallel: bool | None = None,
):
    """Convert (``bridge.to_megatron_model``), wrap in DDP, build optimizer and scheduler: one call per rank.

    ``sequence_parallel``: None leaves it to the conversion (on for MoE with TP > 1, as Megatron-Core needs).

    With ``lora``, adapters go on the converted model before it is wrapped (``bridge.lora.apply_lora``,
    initialised from ``cfg.seed`` the same at every layout): the base is frozen, so DDP's gradient
    buffers and the (distributed) optimizer hold the adapter parameters only. The base then has to be
    the HF weights (``load_weights=True``; a weights-only checkpoint may replace them later). Raises
    ``LoraError`` on every rank, naming it, for a target the model lacks or cannot adapt.
    """
    chunks = bridge.to_megatron_model(
        tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp, load_weights=load_weights, seed=cfg.seed, sequence_parallel=sequence_parallel
    )
    check_schedule(cfg)
    if lora is not None:
        apply_lora(chunks, bridge, lora, seed=cfg.seed)
    model = wrap_model(chunks, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    return model, optimizer, scheduler
