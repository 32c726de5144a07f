"""What the stored weight values are: a float dtype a weight may have, and NaN/Inf counts, read in bounded blocks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from bridge.hf.reader import SafetensorsReader

# Dtypes a float weight may be stored in. Any other (integers, bool, fp8, complex) would be imported
# by a cast that changes what the values mean: quantized checkpoints need their own formats.
WEIGHT_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})
# Most bytes of a tensor read at once when counting its NaN/Inf values, so that counting a huge tensor stays small.
COUNT_BLOCK_BYTES = 8 * 2**20


def non_float_weights(reader: SafetensorsReader, names: Iterable[str]) -> list[str]:
    """A line for each of ``names`` (float weights the model reads) stored in a dtype other than ``WEIGHT_DTYPES``.

    Importing one would cast it: int8 or fp8 codes without their scales, or a bool mask, would
    silently become weights of another meaning.
    """
    problems = []
    for name in names:
        if name not in reader:
            continue
        dtype = reader.lazy(name).dtype
        if dtype not in WEIGHT_DTYPES:
            problems.append(f"{name} in {reader.file_of(name).name} is {str(dtype).removeprefix('torch.')}")
    return problems


@dataclass(frozen=True)
class NonFinite:
    """How many NaN and ±Inf values a tensor holds, of how many."""

    nan: int
    inf: int
    total: int

    def __bool__(self) -> bool:
        return bool(self.nan or self.inf)


def count_nonfinite(tensor) -> NonFinite:
    """NaN and ±Inf values in ``tensor`` (a ``LazyTensor`` or a view of one), read in blocks of rows.

    Each block is at most ``COUNT_BLOCK_BYTES`` (one row at least) and is dropped before the next
    is read, so that counting streams however large the tensor is.
    """
    if not tensor.shape:  # a scalar: nothing to narrow
        return _count_block(tensor.select_slice(()))
    rows = tensor.shape[0]
    row_bytes = max(1, torch.Size(tensor.shape[1:]).numel() * tensor.dtype.itemsize)
    step = max(1, COUNT_BLOCK_BYTES // row_bytes)
    nan = inf = 0
    for start in range(0, rows, step):
        found = _count_block(tensor.narrow(0, start, min(step, rows - start)))
        nan, inf = nan + found.nan, inf + found.inf
    return NonFinite(nan, inf, tensor.shape.numel())


def _count_block(block: torch.Tensor) -> NonFinite:
    if bool(torch.isfinite(block).all()):
        return NonFinite(0, 0, block.numel())
    return NonFinite(int(torch.isnan(block).sum()), int(torch.isinf(block).sum()), block.numel())


def nonfinite_counts(reader: SafetensorsReader, names: Iterable[str]) -> dict[str, NonFinite]:
    """The counts of those of ``names`` that hold NaN or Inf, one tensor at a time.

    Names not in the checkpoint and tensors not of a float weight's dtype are skipped: validation
    reports them.
    """
    counts = {}
    for name in names:
        if name in reader and reader.lazy(name).dtype in WEIGHT_DTYPES and (found := count_nonfinite(reader.lazy(name))):
            counts[name] = found
    return counts
