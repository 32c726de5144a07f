"""Export written by every rank that holds shards: same tensors as one writer, one folder, and one error everywhere.

One group of 4 gloo processes (TP2·PP2) runs every case; the tests read its results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.local_launch import run_distributed

WORLD = 4


def _export(bridge, model, out: Path, **kwargs) -> str | None:
    """Write ``out`` with ``write_hf_folder``; the error's type and message this rank raised, or None."""
    from bridge import export_metadata
    from bridge.folder_export import write_hf_folder

    try:
        write_hf_folder(
            bridge.plan(model),
            out,
            config=export_metadata.export_config(bridge.hf_folder, bridge.hf_config, None),
            side_files=export_metadata.side_files(bridge.hf_folder, bridge.hf_config),
            target_dtype=lambda name, dtype: dtype,
            **kwargs,
        )
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def _folder_report(out: Path, source: str) -> dict:
    from bridge.verify import compare_tensors, load_hf_tensors

    index = json.loads((out / "model.safetensors.index.json").read_text())
    return {
        "differences": compare_tensors(load_hf_tensors(source), load_hf_tensors(out)),
        "files": sorted(set(index["weight_map"].values())),
        "on_disk": sorted(p.name for p in out.glob("*.safetensors")),
        "leftovers": sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")),
    }


def parallel_export_cases(source: str, root: str) -> dict:
    import torch.distributed as dist

    from bridge import AutoBridge, folder_export
    from bridge.hf_writer import HFFolderWriter, ShardSequenceWriter

    rank, root = dist.get_rank(), Path(root)
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model(tp=2, pp=2)
    plan = bridge.plan(model)
    writers = plan.assign_writers(spread=True)
    written = {r: sum(plan.full_bytes(e) for e in plan.exported_entries() if writers[e.name] == r) for r in range(WORLD)}
    result: dict = {"written_bytes": written, "errors": {}}

    result["errors"]["spread"] = _export(bridge, model, root / "spread")
    result["errors"]["single"] = _export(bridge, model, root / "single", spread=False)
    result["errors"]["small_shards"] = _export(bridge, model, root / "small", max_shard_size="30KB")

    original = folder_export.sees_folder
    if rank == 2:  # as if rank 2 were on a machine without the shared filesystem
        folder_export.sees_folder = lambda folder: False
    result["errors"]["unshared"] = _export(bridge, model, root / "unshared")
    folder_export.sees_folder = original

    for failing, cls in ((3, ShardSequenceWriter), (0, HFFolderWriter)):
        add = cls.add
        if rank == failing:
            def broken(self, name, tensor, _add=add):
                if name.endswith("mlp.down_proj.weight"):
                    raise OSError(28, "No space left on device (test)")
                return _add(self, name, tensor)

            cls.add = broken
        result["errors"][f"fails_on_{failing}"] = _export(bridge, model, root / f"fails-on-{failing}")
        cls.add = add

    from mappings import MappingError, QKVMapping

    convert = QKVMapping.megatron_to_hf
    if rank == 3:  # a conversion that fails on one writer, mid-transfer
        def failing(self, shards, ctx, _convert=convert):
            if ".3." in self.megatron_param:
                raise MappingError(f"{self.megatron_param}: broken (test)")
            return _convert(self, shards, ctx)

        QKVMapping.megatron_to_hf = failing
    result["errors"]["conversion_fails_on_3"] = _export(bridge, model, root / "fails-converting")
    QKVMapping.megatron_to_hf = convert

    if rank == 0:
        for case in ("spread", "single", "small", "unshared"):
            result[case] = _folder_report(root / case, source)
        result["failed_targets"] = [str(p) for p in root.iterdir() if p.name.startswith(("fails", ".fails"))]
    return result


@pytest.fixture(scope="module")
def cases(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel-export")
    return run_distributed(parallel_export_cases, WORLD, str(tiny_checkpoints["llama"]), str(root))


def test_every_rank_writes_about_the_same_bytes(cases):
    written = cases[0]["written_bytes"]
    assert all(written[r] > 0 for r in range(WORLD)), written
    assert max(written.values()) <= 1.6 * min(written.values()), written


@pytest.mark.parametrize("case", ["spread", "single", "small", "unshared"])
def test_folder_holds_the_source_tensors_bit_for_bit(cases, case):
    assert all(results["errors"][{"small": "small_shards"}.get(case, case)] is None for results in cases)
    report = cases[0][case]
    assert report["differences"] == []
    assert report["files"] == report["on_disk"]  # no shard outside the index, none missing
    assert report["leftovers"] == []


def test_each_holding_rank_writes_its_own_shards(cases):
    assert len(cases[0]["spread"]["files"]) == WORLD  # one (under 5GB) shard per rank
    assert len(cases[0]["single"]["files"]) == 1
    assert len(cases[0]["unshared"]["files"]) == 1  # a rank that cannot see the folder: rank 0 writes all
    small = cases[0]["small"]["files"]
    assert len(small) > 2 * WORLD and small == [f"model-{i:05d}-of-{len(small):05d}.safetensors" for i in range(1, len(small) + 1)]


@pytest.mark.parametrize("failing", [3, 0])
def test_a_write_error_on_one_rank_is_raised_on_every_rank_and_leaves_no_folder(cases, failing):
    errors = [results["errors"][f"fails_on_{failing}"] for results in cases]
    assert errors == ["OSError: [Errno 28] No space left on device (test)"] * WORLD
    assert cases[0]["failed_targets"] == []


def test_a_conversion_error_on_one_writer_is_raised_everywhere_without_a_hang(cases):
    errors = [results["errors"]["conversion_fails_on_3"] for results in cases]
    assert errors == ["MappingError: decoder.layers.3.self_attention.linear_qkv.weight: broken (test)"] * WORLD
    assert cases[0]["failed_targets"] == []
