"""Keep Python's full garbage collections off the objects that exist before a conversion starts.

A converting process holds hundreds of thousands of objects of torch, transformers and
Megatron-Core, and a full (generation-2) collection walks all of them, at whatever point the
conversion's allocations trigger one (docs/design.md, "Start-up and the garbage collector").
``frozen_heap`` moves those objects to the
permanent generation for the duration (``gc.freeze``) and back at the end (``gc.unfreeze``): the
collector keeps running, so cyclic garbage the conversion makes is still collected, but its full
collections only walk what the conversion made.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Objects alive at entry are skipped by collections until exit; usable as a decorator.

    Where objects are frozen already (an application that manages ``gc.freeze`` itself, or an
    enclosing ``frozen_heap``), nothing is changed.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
