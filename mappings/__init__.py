"""Parameter mappings between HF tensors and Megatron-Core parameters, and their registry."""

from mappings.auto import AutoMapping
from mappings.base import JoinedShards, MappingContext, MappingError, ParamMapping, RowCopy, TensorSource, copy_bytes, materialize
from mappings.gated_mlp import GatedMLPMapping
from mappings.linear import ColumnParallelMapping, ReplicatedMapping, RowParallelMapping, VocabParallelMapping
from mappings.qkv import QKVMapping
from mappings.registry import MappingRegistry

__all__ = [
    "AutoMapping",
    "ColumnParallelMapping",
    "GatedMLPMapping",
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
    "VocabParallelMapping",
    "copy_bytes",
    "materialize",
]
