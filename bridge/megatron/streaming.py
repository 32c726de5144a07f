"""What the bounded-memory conversions (``streaming_import``, ``streaming_export``) share.

Both run in one process through the TP=PP=1 model built on the meta device (``meta_model``): a dist
checkpoint's sharded keys and global shapes do not depend on the layout it is saved at, so that
model's names, shapes, dtypes and ``sharded_state_dict()`` describe any checkpoint of the model,
with nothing allocated. Each conversion counts, for each parameter (or batch of them), the bytes
it will hold, and refuses a budget below the largest count ``with_margin`` before anything is
written; what is counted and how it was measured: docs/design.md, "Streaming conversions within a
memory budget".
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

from bridge.engine.plan import TransferPlan
from bridge.megatron import checkpoint as mc
from bridge.runtime.memory_budget import MemoryBudget, memory_budget
from bridge.runtime.write_errors import size_text

MiB = 2**20
# What a streamed conversion holds besides the tensors it counts: DCP's plans and metadata, progress
# bars, allocator slack (measured at 0.5 MiB with 20 tensors, at most 7 MiB with 867: docs/design.md).
OVERHEAD_BYTES = 24 * MiB
# Counted on top of the tensors' bytes for allocator rounding: 1/_ROUNDING_SHARE of them.
_ROUNDING_SHARE = 64


class MemoryBudgetError(ValueError):
    """A tensor cannot be converted within ``--max-memory``."""


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def with_margin(held: int) -> int:
    """The smallest budget for a step that holds ``held`` bytes of tensors: plus ``OVERHEAD_BYTES`` and the rounding share."""
    return held + held // _ROUNDING_SHARE + OVERHEAD_BYTES


def size_arg(size: int) -> str:
    """``size`` bytes as a ``--max-memory`` value that is not below it, with the rounded figure: ``2197MiB (2.1 GiB)``."""
    return f"{-(-size // MiB)}MiB ({size_text(size)})"


def over_budget(what: str, held: list[tuple[str, int]], budget: MemoryBudget, minimum: int) -> MemoryBudgetError:
    """The refusal of a budget below ``minimum``: ``what`` holds the ``held`` (what, bytes) at once, and the budget that would do."""
    counted = sum(size for _, size in held)
    detail = ", ".join(f"{label} {_amount(size)}" for label, size in held if size)
    return MemoryBudgetError(
        f"{what} needs {_amount(minimum)} to convert ({detail}, and {_amount(minimum - counted)} for the conversion itself), "
        f"more than {budget.text} allows; raise --max-memory to at least {size_arg(minimum)}"
    )


def _amount(size: int) -> str:
    return size_text(size) if size >= MiB else f"{size / 2**10:.1f} KiB"


def parameter_chunks(model: dict) -> dict[str, list[ShardedTensor]]:
    """State-dict key → the ShardedTensors it is saved as (factories built; their data are meta views of the parameter)."""
    built = dict(model)  # apply_factories replaces entries of this copy, not of the model's state dict
    apply_factories(built)
    return {key: [sh for sh in nested_values({key: value}) if isinstance(sh, ShardedTensor)] for key, value in built.items()}


def model_chunks(state: dict) -> dict[str, list[ShardedTensor]]:
    """``parameter_chunks`` of the model's part of a Megatron-LM state dict (its one nested dict)."""
    (key,) = [key for key, value in state.items() if isinstance(value, dict)]
    return parameter_chunks(state[key])


@contextlib.contextmanager
def returned_to_the_os() -> Iterator[None]:
    """Make glibc hand freed blocks of 1 MiB and more back to the OS at once, so resident memory follows what is in use.

    It also keeps the arenas new threads get to two: freed small blocks (a quantized checkpoint's decoding
    makes many) stay in the arena of the thread that freed them, and with one arena per thread the
    import of an MXFP4 checkpoint peaked anywhere from 48 to 61 MiB over the same run (48 with two).
    The settings stay for the rest of the process (glibc cannot go back to its dynamic threshold):
    meant for one-shot conversion commands. No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 2)
    yield


def meta_model(bridge, padded_vocab_size: int | None = None, vocab_divisible_by: int = 128) -> tuple[list, TransferPlan, dict]:
    """The TP=PP=1 model on the meta device, its transfer plan and its Megatron-LM state dict.

    ``padded_vocab_size`` (an existing checkpoint's) wins over ``vocab_divisible_by``.
    """
    with torch.device("meta"):
        model = bridge.to_megatron_model(
            tp=1, pp=1, load_weights=False, make_vocab_size_divisible_by=vocab_divisible_by, padded_vocab_size=padded_vocab_size
        )
    return model, bridge.plan(model), mc.model_state_dict(model)


def region(full: torch.Tensor, view: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a real, contiguous copy of ``param``) that the meta ``view`` of ``param`` covers."""
    if view.shape == param.shape and view.storage_offset() == param.storage_offset():
        return full
    return full.as_strided(view.shape, view.stride(), full.storage_offset() + view.storage_offset() - param.storage_offset())


@dataclass(frozen=True)
class Streamed:
    """A streamed conversion's budget and the peak it measured (``PeakMemory``: None where it cannot be measured)."""

    budget: MemoryBudget
    peak: int | None
    exact: bool = True

    def text(self) -> str:
        """``peak 2.1 GiB of --max-memory 4GB`` (``at most`` where the peak is only a bound)."""
        if self.peak is None:
            return f"within {self.budget.text}"
        return f"peak {'' if self.exact else 'at most '}{size_text(self.peak)} of {self.budget.text}"


def budget_of(max_memory: MemoryBudget | int | str | None) -> MemoryBudget:
    """``max_memory`` as a ``MemoryBudget`` (None: the default, from this machine's memory now)."""
    return max_memory if isinstance(max_memory, MemoryBudget) else memory_budget(max_memory)
