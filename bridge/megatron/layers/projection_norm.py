"""RMSNorm over all heads of a q or k projection (OLMo-2, OLMoE), with the heads split over TP ranks.

transformers normalises ``q_proj(x)`` as one vector of ``heads × head_dim`` before splitting it into
heads. Megatron-Core hands its q/k norm one rank's heads (``[s, b, local heads, head_dim]``), so the
mean square needs every rank's sum of squares: one all-reduce over the tensor-parallel group, and in
the backward pass one more (every rank's gradient of the shared sum reaches every rank).

The weight is kept whole on every rank, like Megatron-Core's per-head q/k norms: each rank uses and
gets gradients for its heads' rows, and ``finalize_model_grads`` sums q/k norm gradients over TP
(by name), which completes every row. A TP-split weight would be summed with the other ranks' rows.
"""

from __future__ import annotations

from typing import Literal

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_config import TransformerConfig


class ProjectionRMSNorm(torch.nn.Module):
    """RMSNorm of one projection (``role``: ``"query"`` or ``"key"``) over all its heads; ``hidden_size`` is the head size.

    Computed as transformers' OLMo norms do: in fp32, the weight applied before casting back.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *, role: Literal["query", "key"]):
        super().__init__()
        heads = config.num_attention_heads if role == "query" else (config.num_query_groups or config.num_attention_heads)
        tp = config.tensor_model_parallel_size
        self.head_dim, self.local_heads, self.eps = hidden_size, heads // tp, eps
        self.width = heads * hidden_size
        self.weight = torch.nn.Parameter(torch.ones(self.width, dtype=config.params_dtype))
        self.tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
        self.first_row = (parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0) * self.local_heads * hidden_size

    def forward(self, heads: torch.Tensor) -> torch.Tensor:
        x = heads.float()
        squares = x.pow(2).sum(dim=(-2, -1), keepdim=True)
        if self.tp_group is not None:  # all-reduced forward, and its gradient all-reduced backward
            squares = copy_to_tensor_model_parallel_region(reduce_from_tensor_model_parallel_region(squares, self.tp_group), self.tp_group)
        x = x * torch.rsqrt(squares / self.width + self.eps)
        rows = self.weight[self.first_row : self.first_row + self.local_heads * self.head_dim]
        return (rows.view(self.local_heads, self.head_dim) * x).to(heads.dtype)

    def extra_repr(self) -> str:
        return f"{self.local_heads} heads × {self.head_dim} from row {self.first_row} of {self.width}, eps={self.eps}"
