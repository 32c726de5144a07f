"""Host→device copies of loaded shards through pinned staging buffers, non-blocking.

A parameter on a GPU filled with ``param.copy_(view_of_the_file_map)`` copies from pageable
memory: the driver bounces it through a small pinned buffer of its own and the call returns only
when the copy is done, so reading the files and the transfer take turns. ``PinnedUpload`` instead
copies each block of rows (at most ``block_bytes``) from the file's map into the free end of one of
``depth`` pinned host buffers, starts its host→device copy with ``non_blocking=True`` and goes on
reading the next block while the DMA runs; small blocks (a QKV shard is one per query group and
projection) share a buffer. When a buffer is full the next one is used, once the event recorded
behind its last copy has completed; ``finish`` waits for all of them, so a load that returns has its
parameters in place. Host memory: ``depth`` buffers, whatever the model's size; torch keeps the
pinned pages in its host cache after the load, for the next one.

Parameters on the CPU do not come here (the load copies into them directly); tests force this path
on the CPU, where the buffers are plain memory and each copy completes at once.
"""

from __future__ import annotations

import math

import torch

BLOCK_BYTES = 64 * 2**20
_ALIGN = 64  # where a block starts in a buffer: any dtype can be viewed there


class PinnedUpload:
    """Copies ``src`` (a host tensor or view) into ``dest`` (rows of a device tensor) a block of rows at a time."""

    def __init__(self, pin: bool, block_bytes: int | None = None, depth: int = 2):
        self.pin = pin
        self.block_bytes = block_bytes or BLOCK_BYTES
        self._buffers: list[torch.Tensor | None] = [None] * depth
        self._events: list[torch.cuda.Event | None] = [None] * depth  # behind each buffer's last copy
        self._current = -1  # the buffer being filled (none yet)
        self._used = 0  # its bytes in use
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
            host = self._space(count * row_bytes).view(dest.dtype).view(count, *dest.shape[1:])
            host.copy_(src.narrow(0, start, count))
            dest.narrow(0, start, count).copy_(host, non_blocking=self.pin)
            self._record(dest)
            self.uploaded += count * row_bytes

    def finish(self) -> None:
        """Wait until every copy started here is done (the buffers may then be reused or freed)."""
        for event in self._events:
            if event is not None:
                event.synchronize()
        self._current, self._used = -1, 0

    def _space(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of free space: after what the current buffer holds, or in the next one once its copies are done."""
        offset = -(-self._used // _ALIGN) * _ALIGN
        buffer = self._buffers[self._current] if self._current >= 0 else None
        if buffer is None or offset + nbytes > buffer.numel():
            self._current = (self._current + 1) % len(self._buffers)
            event = self._events[self._current]
            if event is not None:
                event.synchronize()
            buffer = self._buffers[self._current]
            if buffer is None or buffer.numel() < nbytes:  # a block, or one row larger than a block
                buffer = self._buffers[self._current] = torch.empty(max(nbytes, self.block_bytes), dtype=torch.uint8, pin_memory=self.pin)
            offset = 0
        self._used = offset + nbytes
        return buffer[offset : offset + nbytes]

    def _record(self, dest: torch.Tensor) -> None:
        """Mark the current buffer busy until the copy into ``dest`` just queued on its device's current stream completes."""
        if dest.is_cuda and self.pin:
            if self._events[self._current] is None:
                self._events[self._current] = torch.cuda.Event()
            self._events[self._current].record(torch.cuda.current_stream(dest.device))
