"""``frozen_heap``: objects alive before a conversion are left out of collections, and only for its duration."""

from __future__ import annotations

import gc
import weakref

from bridge.runtime.gc_freeze import frozen_heap


class _Node:
    pass


def _cycle() -> weakref.ref:
    node = _Node()
    node.self = node
    return weakref.ref(node)


def test_objects_alive_at_entry_are_frozen_until_exit_and_new_cycles_are_still_collected():
    assert gc.get_freeze_count() == 0
    old = _cycle()  # garbage already, but only a collection can free it
    with frozen_heap():
        assert gc.get_freeze_count() > 0
        new = _cycle()
        gc.collect()
        assert new() is None  # made inside: collected
        assert old() is not None  # alive at entry: frozen, not walked
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert old() is None


def test_a_heap_frozen_by_the_caller_is_left_frozen():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with frozen_heap():
            with frozen_heap():
                pass
            assert gc.get_freeze_count() == count
        assert gc.get_freeze_count() == count  # not unfrozen: the caller froze it
    finally:
        gc.unfreeze()


def test_it_unfreezes_when_the_block_raises_and_works_as_a_decorator():
    @frozen_heap()
    def convert() -> int:
        assert gc.get_freeze_count() > 0
        raise RuntimeError("conversion failed")

    try:
        convert()
    except RuntimeError:
        pass
    assert gc.get_freeze_count() == 0
