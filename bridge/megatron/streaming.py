"""What the bounded-memory conversions (``streaming_import``, ``streaming_export``) share.

Both run in one process through the TP=PP=1 model built on the meta device (``meta_model``): a dist
checkpoint's sharded keys and global shapes do not depend on the layout it is saved at, so that
model's names, shapes, dtypes and ``sharded_state_dict()`` describe any checkpoint of the model,
with nothing allocated. How each conversion stays within ``--max-memory``: docs/design.md,
"Streaming conversions within a memory budget".
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from typing import Iterator

import torch

from bridge.engine.plan import TransferPlan
from bridge.megatron import checkpoint as mc

DEFAULT_MAX_MEMORY = "4GB"


class MemoryBudgetError(ValueError):
    """A tensor cannot be converted within ``--max-memory``."""


def tensor_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@contextlib.contextmanager
def returned_to_the_os() -> Iterator[None]:
    """Make glibc hand freed blocks of 1 MiB and more back to the OS at once, so resident memory follows what is in use.

    The setting stays for the rest of the process (glibc cannot go back to its dynamic threshold):
    meant for one-shot conversion commands. No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)
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
