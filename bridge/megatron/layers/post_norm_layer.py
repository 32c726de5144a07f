"""A transformer layer that normalises each sublayer's output before its residual add (OLMo-2, Gemma 2/3).

transformers: ``h = h + post_attention_norm(attention(pre_norm(h)))``, the same around the MLP.
Megatron-Core's ``TransformerLayer`` adds a sublayer's output to the residual in its bias-dropout-add
step; this layer builds the two norms and wraps those steps so that the output is normalised first.
Everything else (recomputation, pipeline, MoE) is Megatron-Core's own layer, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass
class PostNormLayerSubmodules(TransformerLayerSubmodules):
    """Megatron-Core's layer submodules plus the norms on the attention and MLP outputs."""

    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    post_mlp_layernorm: ModuleSpec | type = IdentityOp


def _normalised_before_add(bias_dropout_add: Callable, norm: torch.nn.Module) -> Callable:
    """``bias_dropout_add`` (Megatron-Core's ``get_bias_dropout_add``) applied to ``norm`` of the sublayer output."""

    def make(training: bool, fused: bool) -> Callable:
        add = bias_dropout_add(training, fused)

        def apply(output_and_bias: tuple[torch.Tensor, torch.Tensor | None], residual: torch.Tensor, prob: float) -> torch.Tensor:
            output, bias = output_and_bias
            if bias is not None:
                raise ValueError("a post-normed sublayer must not return a separate bias (add_bias_linear=False)")
            return add((norm(output), None), residual, prob)

        return apply

    return make


class PostNormTransformerLayer(TransformerLayer):
    """Megatron-Core's ``TransformerLayer`` with ``post_self_attn_layernorm`` and ``post_mlp_layernorm``."""

    def __init__(self, config: TransformerConfig, submodules: PostNormLayerSubmodules, *args: Any, **kwargs: Any):
        super().__init__(config, submodules, *args, **kwargs)
        norm = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm)
        self.self_attn_bda = _normalised_before_add(self.self_attn_bda, self.post_self_attn_layernorm)
        self.mlp_bda = _normalised_before_add(self.mlp_bda, self.post_mlp_layernorm)
