"""Writing runs of bytes into a file at given offsets, with ``O_DIRECT`` where the filesystem takes it.

Why ``O_DIRECT`` and how its alignment is met: docs/design.md, "Writing safetensors shards".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from bridge.mappings import JoinedShards, copy_bytes

logger = logging.getLogger(__name__)

_WRITE_CHUNK = 1 << 30  # below Linux's 2 GiB limit on one write()
DIRECT_BLOCK = 4096  # O_DIRECT alignment of memory, offsets and lengths (a multiple of any device's logical block)
STAGE_BYTES = 8 * 2**20  # the staging buffer of O_DIRECT writes


class DataAppender:
    """Writes a file's data in runs (each run's bytes in order; a run starts wherever the caller says).

    Only the bytes of the runs are written: bytes around a run (a header, another writer's part of
    the same file) are never overwritten, whether or not a run's ends fall on block boundaries.
    Whole blocks go through ``O_DIRECT`` where it is available and accepted; everything else, and
    everything where it is not, through ``buffered_fd``. At most two staging buffers of
    ``STAGE_BYTES`` are held, one filled by the caller while the other is written by a background
    thread.
    """

    def __init__(self, path: Path, buffered_fd: int):
        self._buffered_fd = buffered_fd
        self._direct_fd: int | None = None
        if hasattr(os, "O_DIRECT"):
            try:
                self._direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._direct_fd = None
        self._stages = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned, as O_DIRECT needs
        self._views = [memoryview(stage) for stage in self._stages]
        self._bytes = [torch.frombuffer(stage, dtype=torch.uint8) for stage in self._stages]  # the same memory, to copy tensors into
        self._writing: list[Future | None] = [None, None]  # each stage's write in flight
        self._current = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._start_run(0)

    @property
    def direct(self) -> bool:
        return self._direct_fd is not None

    def append(self, data: torch.Tensor | JoinedShards, offset: int | None = None) -> None:
        """Write the bytes of ``data`` at ``offset``, or right after the bytes written last; an offset elsewhere starts a new run.

        The bytes are copied from the tensor (or the parts of a ``JoinedShards``) straight into the
        stages (``copy_bytes``); ``check_writable`` says what can be given.
        """
        if offset is not None and offset != self._offset + self._fill:
            self._submit()
            self._start_run(offset)
        done, total = 0, data.nbytes
        while done < total:
            count = min(total - done, STAGE_BYTES - self._fill)
            copy_bytes(data, self._bytes[self._current][self._fill : self._fill + count], done)
            self._fill += count
            done += count
            if self._fill == STAGE_BYTES:
                self._submit()
                self._start_run(self._offset + STAGE_BYTES)

    def finish(self) -> None:
        """Write what the stages hold and close."""
        try:
            self._submit()
            for index in range(2):
                self._wait(index)
        finally:
            self.close()

    def close(self) -> None:
        for index in range(2):
            with contextlib.suppress(Exception):  # on an error path only: finish() has waited already
                self._wait(index)
        self._writer.shutdown(wait=True)
        if self._direct_fd is not None:
            os.close(self._direct_fd)
            self._direct_fd = None
        self._bytes = []
        for view, stage in zip(self._views, self._stages):
            with contextlib.suppress(BufferError):  # a failed write's traceback may still hold a slice; GC frees it
                view.release()
                stage.close()

    def _start_run(self, offset: int) -> None:
        self._offset = offset - offset % DIRECT_BLOCK  # file offset of the current stage's first byte
        self._first = self._fill = offset - self._offset  # the stage's bytes in [first, fill) are the run's

    def _submit(self) -> None:
        """Hand the current stage's bytes to the background writer and move to the other stage once it is free."""
        if self._fill > self._first:
            view = self._views[self._current]
            self._writing[self._current] = self._writer.submit(self._write, view, self._first, self._fill, self._offset)
            self._current ^= 1
            self._wait(self._current)  # the next stage's previous write must be done before it is refilled

    def _wait(self, index: int) -> None:
        """Wait for stage ``index``'s write (raising its error)."""
        future, self._writing[index] = self._writing[index], None
        if future is not None:
            future.result()

    def _write(self, view: memoryview, first: int, end: int, offset: int) -> None:
        """Write a stage's bytes ``[first, end)`` at ``offset + first``: whole blocks direct, partial ones buffered."""
        head = min(round_up(first, DIRECT_BLOCK), end) if self.direct else end
        tail = max(head, end - end % DIRECT_BLOCK)
        if head > first:
            write_all(self._buffered_fd, view[first:head], offset + first)
        if tail > head:
            try:
                write_all(self._direct_fd, view[head:tail], offset + head)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                logger.info("O_DIRECT writes refused here (%s); writing through the page cache", err)
                os.close(self._direct_fd)
                self._direct_fd = None
                write_all(self._buffered_fd, view[head:tail], offset + head)
        if end > tail:
            write_all(self._buffered_fd, view[tail:end], offset + tail)


def write_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (in pieces below Linux's limit on one write); a write that makes no progress raises."""
    done = 0
    while done < len(data):
        written = os.pwrite(fd, data[done : done + _WRITE_CHUNK], offset + done)
        if written <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset + done}")
        done += written


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
