"""Alternative on-disk layouts of HF checkpoints, seen through the names the mappings use.

transformers 5 holds MoE experts fused (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``,
``mlp.experts.down_proj`` ``[E, H, I]``) and writes per-expert names by default, but a checkpoint
saved with ``save_original_format=False`` carries the fused tensors. A model bridge declares views
that present such tensors under the per-expert names, reading only the slices asked for, so one
mapping table serves both layouts. Exports write the per-expert names (what vLLM reads), except
for the slices of a tensor a family stores stacked (``stacked_experts``), which go back into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\*", r"(\d+)") + "$")


def _fill(template: str, values) -> str:
    for value in values:
        template = template.replace("*", str(value), 1)
    return template


class ExpertSlice:
    """Expert ``e``'s part ``part`` of ``parts`` (split along dim 1, the output dim) of a fused ``[E, out, in]`` or ``[E, out]`` tensor."""

    def __init__(self, base, expert: int, part: int, parts: int):
        self.base, self.expert, self.part = base, expert, part
        rows = base.shape[1] // parts
        self.row0 = part * rows
        self.shape = torch.Size([rows, *base.shape[2:]])
        self.dtype = base.dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim == 0:
            rows, cols = slice(self.row0 + start, self.row0 + start + length), slice(None)
        else:
            rows, cols = slice(self.row0, self.row0 + self.shape[0]), slice(start, start + length)
        index = (slice(self.expert, self.expert + 1), rows, cols)
        return self.base.select_slice(index[: len(self.base.shape)])[0]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclass(frozen=True)
class FusedExperts:
    """``fused`` (a pattern with ``*`` for the layer) holds per-expert tensors ``parts`` stacked along dim 1.

    ``parts`` are per-expert name templates with ``*`` for the layer and ``{e}`` for the expert,
    in the order they are concatenated (e.g. gate then up).
    """

    fused: str
    parts: tuple[str, ...]

    def expand(self, name: str, base, stored=None) -> dict[str, ExpertSlice] | None:
        match = _pattern(self.fused).match(name)
        if match is None:
            return None
        views = {}
        for expert in range(base.shape[0]):
            for index, template in enumerate(self.parts):
                virtual = _fill(template.replace("{e}", str(expert)), match.groups())
                views[virtual] = ExpertSlice(base, expert, index, len(self.parts))
        return views


@dataclass(frozen=True)
class Renamed:
    """A tensor stored as ``stored`` that the mappings know as ``name`` (patterns with ``*``)."""

    stored: str
    name: str

    def expand(self, name: str, base, stored=None) -> dict | None:
        match = _pattern(self.stored).match(name)
        return None if match is None else {_fill(self.name, match.groups()): base}


STACKED_SLICE = re.compile(r"^(.+)\[(\d+)\]$")


def stacked_slice_name(stacked: str, index: int | str) -> str:
    """The name of slice ``index`` (along dim 0) of the HF tensor ``stacked``: ``stacked[index]``."""
    return f"{stacked}[{index}]"


def split_stacked_name(name: str) -> tuple[str, int] | None:
    """``(stacked, index)`` for a slice name ``stacked[index]``, else None."""
    match = STACKED_SLICE.match(name)
    return None if match is None else (match.group(1), int(match.group(2)))


def stacked_experts(stacked: str) -> FusedExperts:
    """The per-expert slices of ``stacked`` (a pattern, ``*`` for the layer), whose dim 0 is the expert, named ``stacked[e]``.

    For a family that stores its experts stacked (gpt-oss's ``mlp.experts.gate_up_proj``): its
    mappings name the slices, the reader presents them (reading only the slice asked for), and an
    export writes them back into the one stacked tensor (``bridge.hf.layout.ShardLayout``).
    """
    return FusedExperts(stacked, (stacked_slice_name(stacked, "{e}"),))
