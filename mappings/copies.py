"""A tensor the HF checkpoint stores under several names, one Megatron-Core parameter.

DeepSeek-V3's and GLM-4.5's multi-token-prediction layers hold their own ``embed_tokens`` and
``shared_head.head``, equal to the model's embedding and output layer, which Megatron-Core's MTP block
shares. Loading checks that each copy equals the main tensor (the slice this rank loads), so that a
checkpoint whose copies differ is refused rather than silently reduced to one; export writes the
parameter under every name.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from bridge.mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, TensorSource, WrappingMapping


class CopiedMapping(WrappingMapping):
    """``inner`` (one HF tensor), whose tensor the checkpoint also holds, identical, under ``copies``."""

    def __init__(self, inner: ParamMapping, copies: Sequence[str]):
        if len(inner.hf_names) != 1 or inner.load_only:
            raise MappingError(f"{inner}: copies are mapped for a mapping of one HF tensor that exports it")
        (main,) = inner.hf_names
        super().__init__(inner, {"": main, **{f"copy {i}": name for i, name in enumerate(copies)}})
        self.kind = inner.kind

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        parts = self.inner.shard_parts({"": hf[""]}, ctx)
        for role, name in self.hf_param.items():
            if not role:
                continue
            copy = self.inner.shard_parts({"": hf[role]}, ctx)
            real = [(a, b) for a, b in zip(parts, copy) if a.device.type != "meta"]
            if len(copy) != len(parts) or not all(_same_bits(a, b) for a, b in real):
                raise MappingError(f"{name} differs from {self.hf_names[0]}: Megatron-Core's {self.megatron_param} is one tensor for both")
        return parts

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, torch.Tensor | JoinedShards]:
        (tensor,) = self.inner.megatron_to_hf(shards, ctx).values()
        return {name: tensor for name in self.hf_names}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (a NaN equals itself, -0.0 differs from +0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
