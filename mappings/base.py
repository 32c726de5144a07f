"""The mapping base class: one object owns both directions of one parameter and its TP layout.

A mapping names one Megatron parameter (pattern with ``*`` standing for a number, e.g. a layer index)
and the HF tensor(s) it is made of. ``shard_parts`` names the row blocks of the HF tensors that
this TP rank's shard is made of, and ``hf_to_megatron`` copies them into the parameter (or a new
tensor); ``megatron_to_hf`` rebuilds the HF tensors from the shards of every TP rank. Nothing here
knows about files, ranks or models: inputs are tensors (or lazy tensors that read only the slice
asked for); a load writes into the parameter (``hf_to_megatron(..., out=param)``), and export returns
contiguous tensors or ``JoinedShards`` that say how to join them without copying.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol, Sequence

import torch


class MappingError(ValueError):
    """An HF tensor or Megatron parameter does not fit its mapping (shape, divisibility, names)."""


class TensorSource(Protocol):
    """What a mapping reads from: a ``torch.Tensor`` or a lazy tensor that reads only what is narrowed."""

    @property
    def shape(self) -> torch.Size: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


RowCopy = Callable[[torch.Tensor, torch.Tensor], None]
"""``copy(dest, src)``: copies ``src`` into ``dest`` (rows of the tensor being built), as ``dest.copy_(src)`` does."""


@dataclass(frozen=True)
class MappingContext:
    """What a mapping may need besides tensors: this rank's TP coordinates and the model's dimensions."""

    tp_rank: int
    tp_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int


class JoinedShards:
    """A tensor given as the parts it is joined from along ``dim`` (TP shards, or row blocks of them), not yet joined.

    Export hands these to the folder writer, which copies their bytes (``copy_bytes``) from the
    parts straight into its staging buffers: the join is never made in memory (docs/design.md,
    "Copies that are never made"). ``materialize()`` is the plain
    ``torch.cat`` for everyone else.
    """

    def __init__(self, parts: Sequence[torch.Tensor], dim: int):
        self.parts = list(parts)
        self.dim = dim % self.parts[0].dim()
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(part.shape[self.dim] for part in self.parts)
        self.shape = torch.Size(shape)

    def __repr__(self) -> str:
        return f"JoinedShards({len(self.parts)} parts along dim {self.dim}, shape {list(self.shape)}, {self.dtype})"

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts)

    def numel(self) -> int:
        return sum(part.numel() for part in self.parts)

    def to(self, dtype: torch.dtype) -> "JoinedShards":
        return self if dtype == self.dtype else JoinedShards([part.to(dtype) for part in self.parts], self.dim)

    def rows(self, start: int, count: int) -> "JoinedShards | torch.Tensor":
        """Rows ``[start, start + count)`` (dim 0), still unjoined: views of the parts."""
        if self.dim != 0:
            return JoinedShards([part.narrow(0, start, count) for part in self.parts], self.dim)
        parts, offset = [], 0
        for part in self.parts:
            lo, hi = max(start, offset), min(start + count, offset + part.shape[0])
            if lo < hi:
                parts.append(part.narrow(0, lo - offset, hi - lo))
            offset += part.shape[0]
        return join_shards(parts, 0)

    def first_rows(self, count: int) -> "JoinedShards | torch.Tensor":
        """The first ``count`` rows (dim 0) of a join along dim 0, still unjoined."""
        if self.dim != 0:
            raise ValueError("first_rows of a join along a dim other than 0")
        return self.rows(0, count)

    def copy_to(self, out: torch.Tensor) -> None:
        """Each part into its place in ``out`` (a tensor of this shape): the join, with no copy in between."""
        offset = 0
        for part in self.parts:
            out.narrow(self.dim, offset, part.shape[self.dim]).copy_(part)
            offset += part.shape[self.dim]

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim)


def join_shards(shards: Sequence[torch.Tensor], dim: int) -> "torch.Tensor | JoinedShards":
    """The parts of a tensor joined along ``dim``, left unjoined (``JoinedShards``); a single part is returned itself.

    Export hands each joined tensor straight to the writer, so a copy here is a copy of the model.
    """
    return shards[0] if len(shards) == 1 else JoinedShards(shards, dim)


def first_rows(tensor: "torch.Tensor | JoinedShards", count: int) -> "torch.Tensor | JoinedShards":
    """The first ``count`` rows of a tensor or of a join along dim 0, without copying."""
    return tensor.first_rows(count) if isinstance(tensor, JoinedShards) else tensor[:count]


def materialize(tensor: "torch.Tensor | JoinedShards") -> torch.Tensor:
    """A plain tensor (joining the parts of a ``JoinedShards``)."""
    return tensor.materialize() if isinstance(tensor, JoinedShards) else tensor


def copy_bytes(tensor: "torch.Tensor | JoinedShards", dest: torch.Tensor, start: int = 0) -> None:
    """Bytes ``[start, start + dest.numel())`` of ``tensor``, row-major as a file stores it, into the uint8 tensor ``dest``.

    Whole rows go from the tensor (or each part of a ``JoinedShards``) straight into ``dest``, viewed
    as rows of the tensor's dtype; only a row cut by either end of the range is copied through a
    one-row temporary. So a writer fills its buffers from non-contiguous views and unjoined TP
    shards with one copy per byte, and a device tensor is copied to the host piece by piece.
    """
    if dest.numel() == 0:
        return
    if not isinstance(tensor, JoinedShards) and tensor.is_contiguous():
        dest.copy_(tensor.reshape(-1).view(torch.uint8)[start : start + dest.numel()])
        return
    row = tensor.nbytes // tensor.shape[0]
    end, pos = start + dest.numel(), start
    while pos < end:
        index, within = divmod(pos, row)
        whole, at = (end - pos) // row if within == 0 else 0, pos - start
        if whole and (dest.storage_offset() + at) % tensor.dtype.itemsize == 0:  # where ``view(dtype)`` allows it
            out = dest[at : at + whole * row].view(tensor.dtype).view(whole, *tensor.shape[1:])
            _copy_rows(tensor, index, whole, out)
            pos += whole * row
        else:
            count = min(row - within, end - pos)
            one = torch.empty((1, *tensor.shape[1:]), dtype=tensor.dtype, device=dest.device)
            _copy_rows(tensor, index, 1, one)
            dest[at : at + count].copy_(one.reshape(-1).view(torch.uint8)[within : within + count])
            pos += count


def _copy_rows(tensor: "torch.Tensor | JoinedShards", start: int, count: int, out: torch.Tensor) -> None:
    block = tensor.rows(start, count) if isinstance(tensor, JoinedShards) else tensor.narrow(0, start, count)
    if isinstance(block, JoinedShards):
        block.copy_to(out)
    else:
        out.copy_(block)


def whole(src: TensorSource) -> torch.Tensor:
    """All of ``src`` as a view (of the file's map, for a lazy tensor): read only when copied."""
    return src.narrow(0, 0, src.shape[0])


def tp_slice(src: TensorSource, dim: int, rank: int, size: int, name: str) -> torch.Tensor:
    """Part ``rank`` of ``size`` equal parts of ``src`` along ``dim``: a view, read from disk only when copied."""
    total = src.shape[dim]
    if total % size:
        raise MappingError(f"{name}: dimension {dim} of size {total} is not divisible by TP size {size}")
    part = total // size
    return src.narrow(dim, rank * part, part)


def zero_rows(rows: int, like: torch.Tensor) -> torch.Tensor:
    """``rows`` rows of zeros shaped like ``like``'s rows, as a view of one row (no memory of its own)."""
    return torch.zeros((1, *like.shape[1:]), dtype=like.dtype).expand(rows, *like.shape[1:])


def assemble_rows(
    parts: Sequence[torch.Tensor], out: torch.Tensor | None, name: str, sources: Sequence[str], copy: RowCopy | None = None
) -> torch.Tensor:
    """``torch.cat(parts, dim=0)``, written into ``out`` when given (converting the dtype as ``copy_`` does).

    Loading passes the parameter itself as ``out``, so a shard is copied once, from the file's map
    into the parameter, and no shard-sized temporary is made (docs/design.md, "Copies that are
    never made"). ``copy(rows_of_out, part)`` does each copy into ``out`` (default
    ``rows_of_out.copy_(part)``): a parameter on a GPU is filled through pinned buffers that way.
    """
    shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
    if out is None:
        if len(parts) == 1:
            return parts[0].contiguous()
        out = torch.empty(shape, dtype=parts[0].dtype)
    elif tuple(out.shape) != shape:
        raise MappingError(f"{name}: built a shard of shape {list(shape)} from {list(sources)}, the parameter has {list(out.shape)}")
    start = 0
    for part in parts:
        rows = out.narrow(0, start, part.shape[0])
        if copy is None:
            rows.copy_(part)
        else:
            copy(rows, part)
        start += part.shape[0]
    return out


_WILDCARD = re.compile(r"\\\*")


class ParamMapping:
    """One Megatron parameter ⇄ one or more HF tensors.

    ``hf_param`` is a single HF name or a dict role → HF name (e.g. ``{"q": ..., "k": ..., "v": ...}``).
    Subclasses implement ``shard_parts`` (load) and ``megatron_to_hf`` (export); ``tp_sharded`` says whether the
    parameter differs across TP ranks (and so must be gathered on export).
    """

    kind = "base"
    tp_sharded = True

    def __init__(self, megatron_param: str, hf_param: str | Mapping[str, str], *, load_only: bool = False):
        self.megatron_param = megatron_param
        self.hf_param: dict[str, str] = {"": hf_param} if isinstance(hf_param, str) else dict(hf_param)
        self.load_only = load_only
        self._regex = _megatron_regex(megatron_param)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.megatron_param!r} ⇄ {self.hf_names})"

    @property
    def hf_names(self) -> list[str]:
        return list(self.hf_param.values())

    def resolve(self, megatron_name: str) -> "ParamMapping | None":
        """A copy bound to a concrete Megatron name, with the ``*`` of the HF names filled in, or None."""
        match = self._regex.match(megatron_name)
        if match is None:
            return None
        bound = copy.copy(self)
        bound.megatron_param = megatron_name
        bound.hf_param = {role: _fill(pattern, match.groups()) for role, pattern in self.hf_param.items()}
        return bound

    def relocated(self, megatron: tuple[str, str], hf: tuple[str, str]) -> "ParamMapping":
        """A copy for another place of the same module: the prefix ``megatron[0]`` of the Megatron pattern becomes
        ``megatron[1]``, ``hf[0]`` of every HF pattern ``hf[1]`` (e.g. a decoder layer's pattern ``decoder.layers.*.``
        ⇄ ``model.layers.*.`` made the multi-token-prediction layer's ``mtp.layers.0.transformer_layer.`` ⇄
        ``model.layers.61.``). Both sides must lose or keep the same number of ``*``."""
        moved = copy.copy(self)
        if not self.megatron_param.startswith(megatron[0]) or not all(name.startswith(hf[0]) for name in self.hf_names):
            raise MappingError(f"{self} is not under {megatron[0]} ⇄ {hf[0]}")
        lost = megatron[0].count("*") - megatron[1].count("*")
        if lost != hf[0].count("*") - hf[1].count("*"):
            raise MappingError(f"relocating {self}: {megatron} and {hf} drop different numbers of '*'")
        moved.megatron_param = megatron[1] + self.megatron_param[len(megatron[0]) :]
        moved._regex = _megatron_regex(moved.megatron_param)
        moved.hf_param = {role: hf[1] + name[len(hf[0]) :] for role, name in self.hf_param.items()}
        return moved

    def under_prefix(self, prefix: str) -> "ParamMapping":
        """A copy whose HF tensors are named ``prefix`` + the names of this one."""
        moved = copy.copy(self)
        moved.hf_param = {role: prefix + pattern for role, pattern in self.hf_param.items()}
        return moved

    def single(self, hf: Mapping[str, TensorSource]) -> TensorSource:
        return hf[""]

    def hf_to_megatron(
        self, hf: Mapping[str, TensorSource], ctx: MappingContext, out: torch.Tensor | None = None, copy: RowCopy | None = None
    ) -> torch.Tensor:
        """This TP rank's shard, written into ``out`` when given (the parameter being loaded), by ``copy`` when given.

        Without ``out``: a new tensor, or, for a shard that is one contiguous block, a view of the
        source itself (of the file's map when reading a checkpoint): copy it to keep it.
        """
        return assemble_rows(self.shard_parts(hf, ctx), out, self.megatron_param, self.hf_names, copy)

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        """The row blocks (along dim 0) that this TP rank's shard is made of, in order: views of the HF tensors."""
        raise NotImplementedError

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, "torch.Tensor | JoinedShards"]:
        raise NotImplementedError

    def role_rows(self, ctx: MappingContext, rows: int) -> dict[str, int]:
        """Rows of each HF role tensor, in ``hf_param`` order, when one tensor of ``rows`` rows holds them all
        stacked along dim 0 (``FusedRowsMapping``); mappings whose roles never come fused do not say."""
        raise MappingError(f"{self.megatron_param}: {type(self).__name__} does not say how its HF tensors stack into one")


class WrappingMapping(ParamMapping):
    """A mapping built around an ``inner`` one for the same Megatron parameter (another on-disk form of its HF tensors):
    TP-sharded as it is, and bound, relocated and prefixed along with it."""

    def __init__(self, inner: ParamMapping, hf_param: str | Mapping[str, str]):
        super().__init__(inner.megatron_param, hf_param, load_only=inner.load_only)
        self.inner = inner

    @property
    def tp_sharded(self) -> bool:  # type: ignore[override]
        return self.inner.tp_sharded

    def resolve(self, megatron_name: str) -> "WrappingMapping | None":
        bound = super().resolve(megatron_name)
        if bound is not None:
            bound.inner = self.inner.resolve(megatron_name)
        return bound

    def relocated(self, megatron: tuple[str, str], hf: tuple[str, str]) -> "WrappingMapping":
        moved = super().relocated(megatron, hf)
        moved.inner = self.inner.relocated(megatron, hf)
        return moved

    def under_prefix(self, prefix: str) -> "WrappingMapping":
        moved = super().under_prefix(prefix)
        moved.inner = self.inner.under_prefix(prefix)
        return moved


def _megatron_regex(pattern: str) -> re.Pattern:
    """The regular expression of a Megatron name pattern, each ``*`` a number."""
    return re.compile("^" + _WILDCARD.sub(r"(\\d+)", re.escape(pattern)) + "$")


def _fill(pattern: str, values: Sequence[str]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(values):
        raise MappingError(f"HF pattern {pattern!r} has {len(parts) - 1} '*' but the Megatron pattern matched {len(values)}")
    out = parts[0]
    for value, part in zip(values, parts[1:]):
        out += value + part
    return out
