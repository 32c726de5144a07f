"""peft's tensors of an adapted stacked expert parameter, seen as one slice per expert (``name[e]``), and joined back.

peft adapts transformers 5's stacked ``[E, out, in]`` expert parameter with one ``lora_A`` of
``[r·E, in]`` (expert ``e``'s A: rows ``e·r`` to ``(e+1)·r``) and one ``lora_B`` of ``[out, r·E]``
(expert ``e``'s B: columns ``e, e+E, e+2E, …``; peft reshapes it ``[out, r, E]``). The adapter
mappings name each expert's slice (``…lora_A.weight[e]``, as ``bridge.mappings.hf_views`` names
slices of stacked tensors), so one mapping per Megatron expert linear moves it. ``ExpertAdapterSlices``
presents a stored adapter's tensors that way to the reader; ``join_expert_slices`` turns an
export's slices back into peft's tensors. Both refuse a tensor that does not split into the experts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from bridge.lora.config import LoraError
from bridge.mappings.fused import RowBlock
from bridge.mappings.hf_views import split_stacked_name, stacked_slice_name


def _is_b(name: str) -> bool:
    return ".lora_B." in name


class _ExpertColumns:
    """Expert ``expert``'s columns (``expert``, ``expert + experts``, …) of a stored ``[out, r·E]`` B, as a ``[out, r]`` tensor."""

    def __init__(self, base, expert: int, experts: int):
        self.base, self.expert, self.experts = base, expert, experts
        self.shape = torch.Size([base.shape[0], base.shape[1] // experts])
        self.dtype = base.dtype

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        rows = self.base.narrow(0, start, length) if dim == 0 else self.base.narrow(0, 0, self.shape[0])
        columns = rows[:, self.expert :: self.experts]
        return columns if dim == 0 else columns.narrow(1, start, length)

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertAdapterSlices:
    """A reader view (``SafetensorsReader(views=)``): the stored tensors ``stacked`` names (patterns, ``*`` for the
    layer) presented as their ``experts`` per-expert slices ``name[e]``."""

    stacked: tuple[str, ...]
    experts: int

    def expand(self, name: str, base, stored=None) -> dict | None:
        if not any(re.fullmatch(re.escape(pattern).replace(r"\*", r"\d+"), name) for pattern in self.stacked):
            return None
        split_dim = 1 if _is_b(name) else 0
        if len(base.shape) != 2 or base.shape[split_dim] % self.experts:
            raise LoraError(
                f"adapter tensor {name} is {list(base.shape)}: its dim {split_dim} does not split into the model's "
                f"{self.experts} experts (peft stacks each expert's r {'columns' if split_dim else 'rows'})"
            )
        if split_dim:
            return {stacked_slice_name(name, e): _ExpertColumns(base, e, self.experts) for e in range(self.experts)}
        rank = base.shape[0] // self.experts
        return {stacked_slice_name(name, e): RowBlock(base, e * rank, rank) for e in range(self.experts)}


def expert_adapter_views(slice_names: Iterable[str], experts: int) -> tuple[ExpertAdapterSlices, ...]:
    """The view of the stacked tensors among the adapter mappings' HF names (``slice_names``: ``stacked[*]`` patterns)."""
    stacked = tuple(sorted({split[0] for split in (_split_pattern(name) for name in slice_names) if split is not None}))
    return (ExpertAdapterSlices(stacked, experts),) if stacked else ()


def _split_pattern(name: str) -> tuple[str, str] | None:
    """``(stacked, index)`` of a slice pattern ``stacked[*]`` or name ``stacked[3]``."""
    match = re.fullmatch(r"(.+)\[(\*|\d+)\]", name)
    return None if match is None else (match.group(1), match.group(2))


def join_expert_slices(pairs: Iterable[tuple[str, torch.Tensor]], experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``pairs`` with each stacked tensor's per-expert slices ``name[e]`` joined into peft's tensor, yielded once all arrived.

    Raises ``LoraError`` on a slice given twice, or slices that do not make the ``experts`` experts.
    """
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in pairs:
        split = split_stacked_name(name)
        if split is None:
            yield name, tensor
            continue
        stacked, index = split
        slices = pending.setdefault(stacked, {})
        if not 0 <= index < experts:
            raise LoraError(f"adapter slice {name}: the model has {experts} experts")
        if index in slices:
            raise LoraError(f"adapter slice {name} is exported twice")
        slices[index] = tensor
        if len(slices) == experts:
            done = pending.pop(stacked)
            ordered = [done[e] for e in range(experts)]
            yield stacked, torch.stack(ordered, dim=-1).flatten(1) if _is_b(stacked) else torch.cat(ordered)
    if pending:
        stacked, slices = next(iter(pending.items()))
        raise LoraError(f"adapter tensor {stacked}: the export has the slices of experts {sorted(slices)}, not all {experts}")
