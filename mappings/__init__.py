"""Parameter mappings between HF tensors and Megatron-Core parameters, and their registry."""

from bridge.mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, RowCopy, TensorSource, copy_bytes, materialize
from bridge.mappings.copies import CopiedMapping
from bridge.mappings.fused import FusedRowsMapping, fused_gate_up, fused_qkv
from bridge.mappings.gated_mlp import GatedMLPMapping
from bridge.mappings.linear import ColumnParallelMapping, ReplicatedMapping, RowParallelMapping, VocabParallelMapping
from bridge.mappings.qkv import QKVMapping
from bridge.mappings.registry import MappingRegistry
from bridge.mappings.transposed import InterleavedGateUpMapping, TransposedRowParallelMapping

__all__ = [
    "ColumnParallelMapping",
    "CopiedMapping",
    "FusedRowsMapping",
    "GatedMLPMapping",
    "InterleavedGateUpMapping",
    "JoinedShards",
    "MappingContext",
    "MappingError",
    "MappingRegistry",
    "ParamMapping",
    "QKVMapping",
    "ReplicatedMapping",
    "RowCopy",
    "RowParallelMapping",
    "TensorSource",
    "TransposedRowParallelMapping",
    "VocabParallelMapping",
    "copy_bytes",
    "fused_gate_up",
    "fused_qkv",
    "materialize",
]
