"""The default ``--max-memory`` (``bridge.runtime.memory_budget``) from given meminfo and cgroup values, ``PeakMemory``,
and the saved chunks the streamed export counts for a read.

Fast tier: no conversion runs; the cgroup files are written under a temporary folder.
"""

from __future__ import annotations

from pathlib import Path

from bridge.runtime.memory_budget import CgroupMemory, available_memory, cgroup_limits, default_budget, memory_budget
from bridge.runtime.peak_memory import PeakMemory

GiB = 2**30
MEMINFO = "MemTotal:       24576000 kB\nMemFree:         2000000 kB\nMemAvailable:   20971520 kB\nCached:          1000000 kB\n"


def test_the_default_is_sixty_percent_of_memavailable():
    available = available_memory(MEMINFO, [])
    assert available == 20 * GiB
    budget = default_budget(available)
    assert budget.bytes == int(0.6 * 20 * GiB)
    assert budget.text == "--max-memory 12.0 GiB (default: 60% of the 20.0 GiB of available memory)"


def test_an_8b_import_needs_no_flag_on_a_24_gib_machine():
    # Llama-3.1-8B's largest tensor (the 1002 MiB embedding) is held twice (parameter and mapped file pages): about 2.1 GiB.
    assert default_budget(available_memory(MEMINFO, [])).bytes > 4 * GiB


def test_a_cgroup_that_leaves_less_room_wins():
    group = CgroupMemory(limit=8 * GiB, usage=3 * GiB, inactive_file=1 * GiB)  # inactive file pages are reclaimed first
    assert group.room == 6 * GiB
    assert available_memory(MEMINFO, [group]) == 6 * GiB
    assert available_memory(MEMINFO, [CgroupMemory(64 * GiB, 1 * GiB)]) == 20 * GiB  # a loose limit changes nothing
    assert CgroupMemory(limit=2 * GiB, usage=3 * GiB).room == 0


def test_without_memavailable_free_and_cached_memory_count():
    old_kernel = "MemTotal: 8000000 kB\nMemFree: 1000000 kB\nBuffers: 100000 kB\nCached: 900000 kB\n"
    assert available_memory(old_kernel, []) == 2_000_000 * 1024


def _files(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limits_are_read_at_every_level_up_to_the_root(tmp_path):
    _files(tmp_path / "user.slice", memory_max=str(8 * GiB), memory_current=str(2 * GiB), memory_stat="anon 1\ninactive_file 1073741824\n")
    _files(tmp_path / "user.slice" / "job", memory_max="max", memory_current=str(GiB))
    membership = tmp_path / "cgroup"
    membership.write_text("0::/user.slice/job\n")
    assert cgroup_limits(tmp_path, membership) == [CgroupMemory(8 * GiB, 2 * GiB, GiB)]


def test_cgroup_v1_limits_and_no_limit(tmp_path):
    memory = tmp_path / "memory"
    _files(
        memory / "docker" / "abc", memory_limit_in_bytes=str(4 * GiB), memory_usage_in_bytes=str(GiB), memory_stat="total_inactive_file 0\n"
    )
    _files(memory, memory_limit_in_bytes="9223372036854771712", memory_usage_in_bytes=str(GiB))  # the root: no limit
    membership = tmp_path / "cgroup"
    membership.write_text("4:memory:/docker/abc\n1:cpu:/\n")
    assert cgroup_limits(tmp_path, membership) == [CgroupMemory(4 * GiB, GiB, 0)]


def test_a_namespaced_cgroup_is_read_at_the_mount_root(tmp_path):
    _files(tmp_path, memory_max=str(16 * GiB), memory_current=str(GiB))
    membership = tmp_path / "cgroup"
    membership.write_text("0::/\n")
    assert cgroup_limits(tmp_path, membership) == [CgroupMemory(16 * GiB, GiB, 0)]
    assert cgroup_limits(tmp_path / "absent", tmp_path / "absent-membership") == []


def test_a_given_budget_is_named_as_given():
    budget = memory_budget("500MiB")
    assert budget.bytes == 500 * 2**20 and budget.text == "--max-memory 500MiB"
    assert memory_budget(None).text.endswith("of available memory)")


def test_peak_memory_counts_what_a_block_touched_beyond_its_start():
    import gc
    import mmap

    held = mmap.mmap(-1, 8 * 2**20)
    held[:: mmap.PAGESIZE] = b"x" * (len(held) // mmap.PAGESIZE)  # resident before the block: not counted
    gc.collect()  # so that no collection frees memory inside the block, which would offset what it takes
    gc.disable()
    try:
        with PeakMemory() as peak:
            block = mmap.mmap(-1, 64 * 2**20)
            block[:: mmap.PAGESIZE] = b"x" * (len(block) // mmap.PAGESIZE)  # every page touched: 64 MiB resident
            block.close()
    finally:
        gc.enable()
    assert peak.exact
    assert 63 * 2**20 < peak.peak < 72 * 2**20, peak.peak
    held.close()


def test_an_export_read_counts_each_saved_chunk_its_region_overlaps_whole():
    """A layer of a key saved stacked (4 layers) at TP=2 is read as its layer's two halves, loaded whole; other layers not at all."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties, TensorStorageMetadata

    from bridge.megatron.streaming_export import _SavedChunks

    chunks = [ChunkStorageMetadata(torch.Size([layer, half * 4, 0]), torch.Size([1, 4, 6])) for layer in range(4) for half in range(2)]
    saved = TensorStorageMetadata(TensorProperties(dtype=torch.bfloat16), torch.Size([4, 8, 6]), chunks)
    reader = _SavedChunks(Metadata({"layers.w": saved}))
    layer_2 = ShardedTensor.from_rank_offsets("layers.w", torch.empty(8, 6, device="meta"), (0, 2, 4), prepend_axis_num=1)
    assert reader.read_for(layer_2) == [4 * 6 * 2, 4 * 6 * 2]
