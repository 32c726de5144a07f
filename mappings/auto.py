"""``AutoMapping``: a one-tensor mapping whose TP layout is read off the Megatron module.

Megatron-Core marks every parameter it shards with ``tensor_model_parallel`` and ``partition_dim``
(local and Transformer Engine modules alike), so those attributes decide column vs row vs replicated;
a ``VocabParallelEmbedding`` is vocab-parallel (padded rows).
"""

from __future__ import annotations

import torch
from bridge.mappings.base import ParamMapping
from bridge.mappings.linear import ColumnParallelMapping, ReplicatedMapping, RowParallelMapping, VocabParallelMapping

_BY_KIND: dict[str, type[ParamMapping]] = {
    cls.kind: cls for cls in (ColumnParallelMapping, RowParallelMapping, ReplicatedMapping, VocabParallelMapping)
}


class AutoMapping(ParamMapping):
    kind = "auto"

    @staticmethod
    def kind_for(module: torch.nn.Module, param: torch.nn.Parameter) -> str:
        """The concrete kind for ``param`` of ``module``."""
        if type(module).__name__ == "VocabParallelEmbedding":
            return VocabParallelMapping.kind
        if not getattr(param, "tensor_model_parallel", False):
            return ReplicatedMapping.kind
        return ColumnParallelMapping.kind if getattr(param, "partition_dim", 0) == 0 else RowParallelMapping.kind

    def specialize(self, kind: str) -> ParamMapping:
        """This mapping as the concrete class for ``kind`` (as found by ``kind_for`` on the owning rank)."""
        return _BY_KIND[kind](self.megatron_param, self.hf_names[0], load_only=self.load_only)
