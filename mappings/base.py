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
from typing import Iterator, Mapping, Protocol, Sequence

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


def read_all(src: TensorSource) -> torch.Tensor:
    """The whole tensor behind a source."""
    return src.narrow(0, 0, src.shape[0]).contiguous()


class JoinedShards:
    """A tensor given as the parts it is joined from along ``dim`` (TP shards, or row blocks of them), not yet joined.

    Export hands these to the folder writer, which writes ``blocks()`` one after another: joins
    along dim 0 are then never copied, and joins along another dim are copied a few MiB at a time
    instead of into one full-size tensor (on the project's VMs, fresh memory for a full copy cost
    more than writing it). ``materialize()`` is the plain ``torch.cat`` for everyone else.
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

    def first_rows(self, count: int) -> "JoinedShards | torch.Tensor":
        """The first ``count`` rows (dim 0) of a join along dim 0, still unjoined."""
        if self.dim != 0:
            raise ValueError("first_rows of a join along a dim other than 0")
        parts, left = [], count
        for part in self.parts:
            if left <= 0:
                break
            parts.append(part[:left])
            left -= part.shape[0]
        return join_shards(parts, 0)

    def materialize(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim)

    def blocks(self, max_bytes: int) -> Iterator[torch.Tensor]:
        """Contiguous tensors whose bytes, one after another, are this tensor's bytes (row-major)."""
        if self.dim == 0:
            for part in self.parts:
                yield part.contiguous()
            return
        row_bytes = max(1, self.nbytes // max(1, self.shape[0]))
        step = max(1, max_bytes // row_bytes)
        for start in range(0, self.shape[0], step):
            rows = min(step, self.shape[0] - start)
            yield torch.cat([part.narrow(0, start, rows) for part in self.parts], dim=self.dim)


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


def assemble_rows(parts: Sequence[torch.Tensor], out: torch.Tensor | None, name: str, sources: Sequence[str]) -> torch.Tensor:
    """``torch.cat(parts, dim=0)``, written into ``out`` when given (converting the dtype as ``copy_`` does).

    Loading passes the parameter itself as ``out``, so a shard is copied once, from the file's map
    into the parameter, and no shard-sized temporary is made (fresh memory costs more to touch on
    these VMs than the copy itself).
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
        out.narrow(0, start, part.shape[0]).copy_(part)
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
        self._regex = re.compile("^" + _WILDCARD.sub(r"(\\d+)", re.escape(megatron_param)) + "$")

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

    def single(self, hf: Mapping[str, TensorSource]) -> TensorSource:
        return hf[""]

    def hf_to_megatron(self, hf: Mapping[str, TensorSource], ctx: MappingContext, out: torch.Tensor | None = None) -> torch.Tensor:
        """This TP rank's shard, written into ``out`` when given (the parameter being loaded).

        Without ``out``: a new tensor, or, for a shard that is one contiguous block, a view of the
        source itself (of the file's map when reading a checkpoint): copy it to keep it.
        """
        return assemble_rows(self.shard_parts(hf, ctx), out, self.megatron_param, self.hf_names)

    def shard_parts(self, hf: Mapping[str, TensorSource], ctx: MappingContext) -> list[torch.Tensor]:
        """The row blocks (along dim 0) that this TP rank's shard is made of, in order: views of the HF tensors."""
        raise NotImplementedError

    def megatron_to_hf(self, shards: Sequence[torch.Tensor], ctx: MappingContext) -> dict[str, "torch.Tensor | JoinedShards"]:
        raise NotImplementedError


def _fill(pattern: str, values: Sequence[str]) -> str:
    parts = pattern.split("*")
    if len(parts) - 1 != len(values):
        raise MappingError(f"HF pattern {pattern!r} has {len(parts) - 1} '*' but the Megatron pattern matched {len(values)}")
    out = parts[0]
    for value, part in zip(values, parts[1:]):
        out += value + part
    return out
