"""The mapping registry: a model's table of Megatron-pattern → HF-pattern mappings.

Resolution is deterministic: a Megatron name must match exactly one pattern (two matches are an
error in the table, not a tie to break).
"""

from __future__ import annotations

from typing import Iterable

from bridge.mappings.base import MappingError, ParamMapping


class MappingRegistry:
    def __init__(self, mappings: Iterable[ParamMapping]):
        self.mappings = list(mappings)

    def __iter__(self):
        return iter(self.mappings)

    def under_prefix(self, prefix: str) -> "MappingRegistry":
        """The same table for a checkpoint that stores these tensors under ``prefix`` (the text model of a
        composite checkpoint: ``language_model.`` + ``model.layers.*…``); the Megatron side is unchanged."""
        return MappingRegistry(mapping.under_prefix(prefix) for mapping in self.mappings)

    def find(self, megatron_name: str) -> ParamMapping | None:
        """The mapping bound to ``megatron_name``, or None when no pattern matches."""
        hits = [bound for m in self.mappings if (bound := m.resolve(megatron_name)) is not None]
        if len(hits) > 1:
            raise MappingError(f"{megatron_name} matches several mappings: {hits}")
        return hits[0] if hits else None

    def resolve(self, megatron_name: str) -> ParamMapping:
        mapping = self.find(megatron_name)
        if mapping is None:
            raise MappingError(f"no mapping for Megatron parameter {megatron_name}")
        return mapping
