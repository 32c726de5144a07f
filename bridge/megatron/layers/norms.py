"""Torch norms for Megatron-Core's local spec that also work with sequence parallelism (and zero-centred RMSNorm).

The local spec's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``, yet a norm is
elementwise over the hidden size and works the same on a sequence shard. Megatron-Core needs
sequence parallelism for MoE at TP > 1, so without a GPU (no Transformer Engine norms) the bridge
swaps in ``SequenceParallelTorchNorm``: the same torch module, its parameters marked
``sequence_parallel`` so ``finalize_model_grads`` all-reduces their gradients over TP as it does for
TE's norms.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaled by ``1 + weight`` (Megatron-Core's ``layernorm_zero_centered_gamma``; Gemma's norms).

    The stored weight is the checkpoint's as is (no ``+1`` folded in, which would not be bit-exact in
    bf16); computed as transformers' Gemma norms do: in fp32, cast back after the scale.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero-centred"


class SequenceParallelTorchNorm:
    """``torch.nn.RMSNorm`` / ``LayerNorm`` built like ``WrappedTorchNorm``, sequence parallelism allowed;
    ``ZeroCenteredRMSNorm`` when the config asks for a zero-centred gamma."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused) -> torch.nn.Module:
        norm_classes = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}
        if config.normalization not in norm_classes:
            raise ValueError(f"normalization {config.normalization!r} is not supported by torch norms")
        if config.layernorm_zero_centered_gamma and config.normalization != "RMSNorm":
            raise ValueError("a zero-centred gamma is mapped for RMSNorm only")
        if config.layernorm_zero_centered_gamma:
            norm = ZeroCenteredRMSNorm(hidden_size, eps=eps)
        else:
            norm = norm_classes[config.normalization](hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def use_torch_norms_with_sequence_parallel(spec):
    """A copy of a (block or layer) spec with every ``WrappedTorchNorm`` replaced by ``SequenceParallelTorchNorm``."""
    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, list):
        return [use_torch_norms_with_sequence_parallel(item) for item in spec]
    if isinstance(spec, ModuleSpec) or dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: use_torch_norms_with_sequence_parallel(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    return spec
