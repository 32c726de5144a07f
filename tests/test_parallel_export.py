"""Export written by every rank that holds shards: same tensors as one writer, one folder, and one error everywhere.

One group of 4 gloo processes (TP2·PP2) runs every case; the tests read its results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bridge.runtime.local_launch import run_distributed

pytestmark = pytest.mark.distributed  # every test starts processes or reads what spawned ranks computed

WORLD = 4


def _export(bridge, model, out: Path, **kwargs) -> str | None:
    """Write ``out`` with ``write_hf_folder``; the error's type and message this rank raised, or None."""
    from bridge.engine.folder_export import write_hf_folder
    from bridge.hf import metadata as export_metadata

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
    from bridge.checks.verify import compare_tensors, load_hf_tensors

    index = json.loads((out / "model.safetensors.index.json").read_text())
    return {
        "differences": compare_tensors(load_hf_tensors(source), load_hf_tensors(out)),
        "files": sorted(set(index["weight_map"].values())),
        "on_disk": sorted(p.name for p in out.glob("*.safetensors")),
        "leftovers": sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")),
    }


def parallel_export_cases(source: str, root: str) -> dict:
    import torch.distributed as dist

    from bridge import AutoBridge
    from bridge.engine import folder_export
    from bridge.hf.data_appender import DataAppender
    from bridge.hf.layout import LayoutWriter

    rank, root = dist.get_rank(), Path(root)
    bridge = AutoBridge.from_hf_pretrained(source)
    model = bridge.to_megatron_model(tp=2, pp=2)
    plan = bridge.plan(model)
    cowritable = {}
    for entry in plan.exported_entries():
        cowritable.setdefault(entry.kind, set()).add(plan.cowritable(entry))
    result: dict = {"errors": {}, "cowritable": cowritable}

    written, sent = [0], [0]
    append, isend = DataAppender.append, dist.isend
    DataAppender.append = lambda self, data, offset=None: (written.__setitem__(0, written[0] + data.nbytes), append(self, data, offset))[1]
    dist.isend = lambda tensor, *args, **kwargs: (sent.__setitem__(0, sent[0] + tensor.nbytes), isend(tensor, *args, **kwargs))[1]
    result["errors"]["spread"] = _export(bridge, model, root / "spread")
    DataAppender.append, dist.isend = append, isend
    result["written_bytes"], result["sent_bytes"] = written[0], sent[0]
    row_parallel = [e for e in plan.exported_entries() if e.kind == "row" and plan.shard_count(e) > 1]
    result["row_parallel_half_bytes"] = sum(plan.full_bytes(e) // 2 for e in row_parallel if rank in plan.shard_holders(e))
    result["errors"]["single"] = _export(bridge, model, root / "single", spread=False)
    result["errors"]["small_shards"] = _export(bridge, model, root / "small", max_shard_size="30KB")

    real_os = folder_export.os
    if rank == 2:  # as if rank 2's bytes were lost by a filesystem where the last writer of a file wins

        class LosingOS:
            def __getattr__(self, name):
                return getattr(real_os, name)

            @staticmethod
            def pwrite(fd, data, offset):
                return len(data)

        folder_export.os = LosingOS()
    DataAppender.append = lambda self, data, offset=None: (written.__setitem__(0, written[0] + data.nbytes), append(self, data, offset))[1]
    written[0] = 0
    result["errors"]["lost_writes"] = _export(bridge, model, root / "lost")
    DataAppender.append, folder_export.os = append, real_os
    result["lost_writes_bytes"] = written[0]

    original = folder_export.sees_folder
    if rank == 2:  # as if rank 2 were on a machine without the shared filesystem
        folder_export.sees_folder = lambda folder: False
    result["errors"]["unshared"] = _export(bridge, model, root / "unshared")
    folder_export.sees_folder = original

    for failing in (3, 0):
        add = LayoutWriter.add
        if rank == failing:

            def broken(self, name, tensor, _add=add):
                if name.endswith("mlp.down_proj.weight"):
                    raise OSError(28, "No space left on device (test)")
                return _add(self, name, tensor)

            LayoutWriter.add = broken
        result["errors"][f"fails_on_{failing}"] = _export(bridge, model, root / f"fails-on-{failing}")
        LayoutWriter.add = add

    from bridge.mappings import MappingError, QKVMapping

    convert = QKVMapping.megatron_to_hf
    if rank == 3:  # a conversion that fails on one writer, mid-transfer (not while planning: that runs on meta tensors)

        def failing(self, shards, ctx, _convert=convert):
            if ".3." in self.megatron_param and not all(shard.is_meta for shard in shards):
                raise MappingError(f"{self.megatron_param}: broken (test)")
            return _convert(self, shards, ctx)

        QKVMapping.megatron_to_hf = failing
    result["errors"]["conversion_fails_on_3"] = _export(bridge, model, root / "fails-converting")
    QKVMapping.megatron_to_hf = convert

    if rank == 0:
        for case in ("spread", "single", "small", "unshared", "lost"):
            result[case] = _folder_report(root / case, source)
        result["spread_folder"], result["single_folder"] = str(root / "spread"), str(root / "single")
        result["header_bytes"] = _header_bytes(root / "spread")
        result["failed_targets"] = [str(p) for p in root.iterdir() if p.name.startswith(("fails", ".fails"))]
    return result


def _header_bytes(folder: Path) -> int:
    import struct

    return sum(8 + struct.unpack("<Q", path.read_bytes()[:8])[0] for path in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def cases(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel-export")
    return run_distributed(parallel_export_cases, WORLD, str(tiny_checkpoints["llama"]), str(root))


def test_every_rank_writes_about_the_same_bytes_and_each_byte_once(cases):
    written = [results["written_bytes"] for results in cases]
    assert all(w > 0 for w in written), written
    assert max(written) <= 1.6 * min(written), written
    data_bytes = sum(p.stat().st_size for p in Path(cases[0]["spread_folder"]).glob("*.safetensors")) - cases[0]["header_bytes"]
    assert sum(written) == data_bytes


def test_a_filesystem_that_loses_one_ranks_bytes_in_a_shared_file_makes_rank_0_write_everything(cases):
    assert cases[0]["lost_writes_bytes"] > 0
    assert [results["lost_writes_bytes"] for results in cases[1:]] == [0] * (WORLD - 1)


def test_only_row_parallel_shards_cross_between_ranks(cases):
    assert cases[0]["cowritable"] == {"vocab": {True}, "qkv": {True}, "gated_mlp": {True}, "row": {False}, "replicated": {False}}
    # each TP pair sends one of its two halves of every row-parallel weight to the other (whichever writes it)
    assert sum(results["sent_bytes"] for results in cases) == sum(results["row_parallel_half_bytes"] for results in cases) // 2


@pytest.mark.parametrize("case", ["spread", "single", "small", "unshared", "lost"])
def test_folder_holds_the_source_tensors_bit_for_bit(cases, case):
    assert all(results["errors"][{"small": "small_shards", "lost": "lost_writes"}.get(case, case)] is None for results in cases)
    report = cases[0][case]
    assert report["differences"] == []
    assert report["files"] == report["on_disk"]  # no shard outside the index, none missing
    assert report["leftovers"] == []


def test_the_files_do_not_depend_on_who_writes_them(cases):
    assert len(cases[0]["spread"]["files"]) == len(cases[0]["single"]["files"]) == len(cases[0]["unshared"]["files"]) == 1
    small = cases[0]["small"]["files"]
    assert len(small) > 2 * WORLD and small == [f"model-{i:05d}-of-{len(small):05d}.safetensors" for i in range(1, len(small) + 1)]
    only = "model-00001-of-00001.safetensors"  # written by all 4 ranks, and by rank 0 alone: the same bytes
    assert (Path(cases[0]["spread_folder"]) / only).read_bytes() == (Path(cases[0]["single_folder"]) / only).read_bytes()


@pytest.mark.parametrize("failing", [3, 0])
def test_a_write_error_on_one_rank_is_raised_on_every_rank_and_leaves_no_folder(cases, failing):
    errors = [results["errors"][f"fails_on_{failing}"] for results in cases]
    # every rank says the same: a full disk, naming the target and the space the folder needs
    assert len(set(errors)) == 1 and errors[0].startswith("DiskFullError: disk full writing "), errors
    assert f"/fails-on-{failing}: it needs about " in errors[0]
    assert cases[0]["failed_targets"] == []


def test_a_conversion_error_on_one_writer_is_raised_everywhere_without_a_hang(cases):
    errors = [results["errors"]["conversion_fails_on_3"] for results in cases]
    assert errors == ["MappingError: decoder.layers.3.self_attention.linear_qkv.weight: broken (test)"] * WORLD
    assert cases[0]["failed_targets"] == []
