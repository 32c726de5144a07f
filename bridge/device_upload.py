"""Host→device copies of loaded shards through pinned staging buffers, non-blocking.

A parameter on a GPU filled with ``param.copy_(view_of_the_file_map)`` copies from pageable
memory: the driver bounces it through a small pinned buffer of its own and the call returns only
when the copy is done, so reading the files and the transfer take turns. ``PinnedUpload`` instead
copies each block of rows (at most ``block_bytes``) from the file's map into one of ``depth``
pinned host buffers, starts its host→device copy with ``non_blocking=True`` and goes on reading the
next block into the other buffer while the DMA runs. A buffer is refilled only after the event
recorded behind its last copy has completed, and ``finish`` waits for all of them, so a load that
returns has its parameters in place. Host memory: ``depth`` buffers, whatever the model's size.

Parameters on the CPU do not come here (the load copies into them directly); tests force this path
on the CPU, where the buffers are plain memory and each copy completes at once.
"""

from __future__ import annotations

import math

import torch

BLOCK_BYTES = 64 * 2**20


class PinnedUpload:
    """Copies ``src`` (a host tensor or view) into ``dest`` (rows of a device tensor) a block of rows at a time."""

    def __init__(self, pin: bool, block_bytes: int | None = None, depth: int = 2):
        self.pin = pin
        self.block_bytes = block_bytes or BLOCK_BYTES
        self._buffers: list[torch.Tensor | None] = [None] * depth
        self._events: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0
        self.uploaded = 0  # bytes copied to the device so far

    @classmethod
    def for_device(cls, device: torch.device) -> "PinnedUpload":
        """Pinned buffers for a CUDA device; plain ones elsewhere (the copy is then synchronous, as without staging)."""
        return cls(pin=device.type == "cuda")

    def copy(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """``dest.copy_(src)`` (``dest`` ≥ 1-D), staged: converted to ``dest``'s dtype on the host, block by block."""
        if tuple(dest.shape) != tuple(src.shape):
            raise ValueError(f"cannot copy a tensor of shape {list(src.shape)} into one of shape {list(dest.shape)}")
        rows = dest.shape[0]
        row_bytes = math.prod(dest.shape[1:]) * dest.dtype.itemsize
        per_block = max(1, self.block_bytes // max(row_bytes, 1))
        for start in range(0, rows, per_block):
            count = min(per_block, rows - start)
            host = self._take(count * row_bytes).view(dest.dtype).view(count, *dest.shape[1:])
            host.copy_(src.narrow(0, start, count))
            dest.narrow(0, start, count).copy_(host, non_blocking=self.pin)
            self._record(dest)
            self.uploaded += count * row_bytes

    def finish(self) -> None:
        """Wait until every copy started here is done (the buffers may then be reused or freed)."""
        for index, event in enumerate(self._events):
            if event is not None:
                event.synchronize()
                self._events[index] = None

    def _take(self, nbytes: int) -> torch.Tensor:
        """The next buffer in turn, once its last copy is done, with at least ``nbytes`` bytes."""
        index = self._next
        event = self._events[index]
        if event is not None:
            event.synchronize()
            self._events[index] = None
        buffer = self._buffers[index]
        if buffer is None or buffer.numel() < nbytes:  # a block, or one row larger than a block
            buffer = self._buffers[index] = torch.empty(max(nbytes, self.block_bytes), dtype=torch.uint8, pin_memory=self.pin)
        return buffer[:nbytes]

    def _record(self, dest: torch.Tensor) -> None:
        """Mark the buffer just used busy until the copy into ``dest`` (queued on the current stream) completes."""
        if dest.is_cuda and self.pin:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(dest.device))
            self._events[self._next] = event
        self._next = (self._next + 1) % len(self._buffers)
