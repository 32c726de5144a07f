"""Progress on rank 0 for steps that report none of their own (a checkpoint save, transformers' load check)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def elapsed_bar(desc: str) -> Iterator[None]:
    """An elapsed-time bar on rank 0's terminal while the block runs (shown after 2 s)."""
    import torch.distributed as dist  # here, not at the top: the CLI imports this module before its first word

    rank = dist.get_rank() if dist.is_initialized() else 0
    bar = tqdm(
        desc=desc,
        total=None,
        bar_format="{desc}: {elapsed}",
        delay=2.0,
        disable=rank != 0 or not sys.stderr.isatty() or bool(os.environ.get("TQDM_DISABLE")),
        file=sys.stderr,
    )
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
