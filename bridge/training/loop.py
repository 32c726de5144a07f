"""The training step and loop: Megatron-Core's schedules, ``finalize_model_grads``, optimizer and scheduler.

``train_step`` is Megatron-LM's: zero the DDP grad buffers, run ``get_forward_backward_func()``
(no pipelining, 1F1B, or interleaved 1F1B when there are several model chunks), step the optimizer
(which clips the gradients and returns their norm), advance the LR schedule by the global batch.
The loss follows Megatron-LM's ``pretrain_gpt``: every micro-batch reports (sum of token losses,
number of tokens) and the step's loss is their ratio over the whole global batch, the same number
whatever the TP×PP×DP layout.

The loss is Megatron-Core's own (the model gets the labels), the cross entropy over the model's *real*
vocabulary: Megatron pads the vocabulary to a multiple of 128×TP, and the model masks those padding
logits out (``bridge.megatron.layers.model_ends.mask_vocab_padding_in_loss``) so the trained model is
exactly the HF model it came from (which has no padding rows) and its loss equals transformers' loss.
Multi-token-prediction layers, when built, add their loss inside the model (Megatron-Core's MTP block).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from bridge.megatron.chunks import unwrap_chunks
from bridge.training.setup import TrainingConfig, num_microbatches

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One optimizer step, as every rank sees it (the loss is broadcast from the last pipeline stage)."""

    iteration: int
    loss: float
    grad_norm: float | None
    lr: float
    num_tokens: int
    skipped: bool
    seconds: float
    mtp_losses: tuple[float, ...] = ()  # each multi-token-prediction layer's loss (unscaled), when the model has them


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def loss_func(loss_mask: torch.Tensor, losses: torch.Tensor):
    """Megatron-LM's GPT loss contract: (sum of masked token losses, token count, {"lm loss": [sum, count]}).

    ``losses``: the model's per-token cross entropy ``[batch, seq]`` (over the real vocabulary).
    """
    mask = loss_mask.float()
    loss = torch.sum(losses.float() * mask)
    num_tokens = mask.sum().detach().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.to(loss.dtype)])
    return loss, num_tokens, {"lm loss": report}


def make_forward_step() -> Callable:
    """A ``forward_step_func(data_iterator, model)`` for GPT batches from ``bridge.training.data``."""

    def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model):
        batch = next(data_iterator)
        device = _model_device(model)
        tokens = batch["tokens"].to(device, non_blocking=True)
        position_ids = batch["position_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        # per-token losses on the last stage, hidden states before it
        output = model(tokens, position_ids, None, labels=labels, loss_mask=loss_mask)
        return output, partial(loss_func, loss_mask)

    return forward_step


def _reduce_loss(losses_reduced: list[dict]) -> torch.Tensor:
    """[loss sum, tokens] of the global batch on every rank (summed over micro-batches and DP, sent down the pipeline)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for report in losses_reduced:
            total += report["lm loss"].to(device=device, dtype=torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            total, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=parallel_state.get_pipeline_model_parallel_group()
        )
    return total


def _mtp_losses(layers: int, microbatches: int) -> tuple[float, ...]:
    """Each MTP layer's loss this step on every rank: Megatron-Core's tracker (per micro-batch means, averaged over
    data-parallel ranks on the last stage), over the step's micro-batches; the tracker is emptied for the next step."""
    if not layers:
        return ()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    values = torch.zeros(layers, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and "values" in MTPLossLoggingHelper.tracker:
        MTPLossLoggingHelper.reduce_loss_in_tracker()
        values += MTPLossLoggingHelper.tracker["values"].to(device=device, dtype=torch.float64) / microbatches
        MTPLossLoggingHelper.clean_loss_in_tracker()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            values, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=parallel_state.get_pipeline_model_parallel_group()
        )
    return tuple(values.tolist())


def train_step(
    forward_step_func: Callable,
    data_iterators: Sequence[Iterator],
    model: list,
    optimizer,
    scheduler,
    cfg: TrainingConfig,
    iteration: int,
) -> StepResult:
    """One optimizer step over one global batch (every rank calls it)."""
    start = time.perf_counter()
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=list(data_iterators),
        model=model,
        num_microbatches=num_microbatches(cfg),
        seq_length=cfg.seq_length,
        micro_batch_size=cfg.micro_batch_size,
        forward_only=False,
    )
    lr = get_canonical_lr_for_logging(optimizer.param_groups)  # the LR this step uses
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=cfg.global_batch_size)
    total = _reduce_loss(losses_reduced)
    mtp = _mtp_losses(unwrap_chunks(model)[0].config.mtp_num_layers or 0, num_microbatches(cfg))
    return StepResult(
        iteration=iteration,
        loss=(total[0] / total[1].clamp(min=1)).item(),
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=float(lr if lr is not None else optimizer.param_groups[0]["lr"]),
        num_tokens=int(total[1].item()),
        skipped=not update_successful,
        seconds=time.perf_counter() - start,
        mtp_losses=mtp,
    )


def format_log_line(result: StepResult, window: Sequence[StepResult], train_iters: int, elapsed: float) -> str:
    """``iteration 5/20 | loss 5.4321 | lr 1.00e-04 | grad norm 1.234 | tokens/s 1234 | elapsed 12.3s``, then the
    multi-token-prediction layers' loss (``| mtp loss 5.6789``, their mean) when the model has them."""
    loss = sum(r.loss for r in window) / len(window)
    mtp = [sum(r.mtp_losses) / len(r.mtp_losses) for r in window if r.mtp_losses]
    tokens_per_s = sum(r.num_tokens for r in window) / max(sum(r.seconds for r in window), 1e-9)
    grad = "n/a" if result.grad_norm is None else f"{result.grad_norm:.3f}"
    skipped = sum(r.skipped for r in window)
    return (
        f"iteration {result.iteration}/{train_iters} | loss {loss:.4f} | lr {result.lr:.3e} | grad norm {grad} | "
        f"tokens/s {tokens_per_s:.0f} | elapsed {elapsed:.1f}s"
        + (f" | skipped {skipped}" if skipped else "")
        + (f" | mtp loss {sum(mtp) / len(mtp):.4f}" if mtp else "")
    )


def train(
    model: list,
    optimizer,
    scheduler,
    data_iterators: Sequence[Iterator],
    cfg: TrainingConfig,
    forward_step_func: Callable,
    start_iteration: int = 0,
    on_step_end: Callable[[StepResult], None] | None = None,
    progress: bool | None = None,
) -> list[StepResult]:
    """Steps ``start_iteration + 1 … cfg.train_iters``; one log line per ``cfg.log_interval`` on rank 0.

    ``on_step_end(result)`` runs on every rank after each step (saving a checkpoint, say).
    ``progress``: a tqdm bar on rank 0 (None: only when stderr is a terminal).
    """
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    for chunk in model:
        chunk.train()
    rank0 = dist.get_rank() == 0
    bar = tqdm(
        total=cfg.train_iters,
        initial=start_iteration,
        desc="training",
        unit="step",
        disable=True if not rank0 or progress is False else (None if progress is None else False),
    )
    results: list[StepResult] = []
    window: list[StepResult] = []
    began = time.perf_counter()
    with logging_redirect_tqdm():
        for iteration in range(start_iteration + 1, cfg.train_iters + 1):
            result = train_step(forward_step_func, data_iterators, model, optimizer, scheduler, cfg, iteration)
            results.append(result)
            window.append(result)
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}")
            if iteration % cfg.log_interval == 0 or iteration == cfg.train_iters:
                if rank0:
                    logger.info(format_log_line(result, window, cfg.train_iters, time.perf_counter() - began))
                window = []
            if on_step_end is not None:
                on_step_end(result)
    bar.close()
    return results
