"""Running a converted model: full-vocab logits through Megatron-Core's own pipeline schedules.

Used by the demo and the parity checks against transformers. Every rank calls ``megatron_logits``;
the ranks of the last pipeline stage get the logits (gathered over TP, vocab padding dropped).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from bridge.megatron.chunks import unwrap_chunks


@contextlib.contextmanager
def main_model_only(chunks: list[torch.nn.Module]) -> Iterator[None]:
    """Inside, the chunks run without their multi-token-prediction block: Megatron-Core 0.16's ``GPTModel`` computes
    MTP only as a loss (it clones the labels), and the MTP layers do not change the main model's logits."""
    # the chunks share one TransformerConfig: switched off and restored together
    saved = [(chunk, chunk.mtp_process, chunk.config.mtp_num_layers) for chunk in chunks if getattr(chunk, "mtp_process", False)]
    try:
        for chunk, _, _ in saved:
            chunk.mtp_process, chunk.config.mtp_num_layers = False, None
        yield
    finally:
        for chunk, process, layers in saved:
            chunk.mtp_process, chunk.config.mtp_num_layers = process, layers


@torch.no_grad()
def megatron_logits(model, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Logits ``[batch, seq, vocab_size]`` on the last PP stage, None on the other stages.

    With pipeline parallelism each sequence is its own micro-batch (the interleaved schedule needs
    as many micro-batches as stages), so the batch size must then be a multiple of the PP size.
    """
    chunks = unwrap_chunks(model)
    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    batch, seq = input_ids.shape
    if pp > 1 and batch % pp:
        raise ValueError(f"with pp={pp} the batch size ({batch}) must be a multiple of pp")
    micro = 1 if pp > 1 else batch
    micro_batches = list(input_ids.to(device).split(micro))
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(micro, seq)
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1).view(1, 1, seq, seq)
    captured: list[torch.Tensor] = []

    def loss_func(output: torch.Tensor):
        captured.append(output)
        return output.new_zeros(()), {}

    def forward_step(data_iterator, chunk):
        return chunk(next(data_iterator), position_ids, causal), loss_func

    iterators = [iter(micro_batches) for _ in chunks]
    with main_model_only(chunks):
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=micro,
            forward_only=True,
        )
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = gather_from_tensor_model_parallel_region(torch.cat(captured, dim=0))
    return logits[..., :vocab_size].float()
