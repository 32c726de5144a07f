"""Writing an HF folder from a model spread over ranks: the ranks that hold its shards write them.

Every rank computes the same ``ShardLayout`` (files, headers, each tensor's offset); rank 0 checks
the target and makes the temporary folder and its files (``HFFolderWriter``). When every rank can
see the folder (one machine, or a shared filesystem), the ranks holding a parameter's
shards write it (``TransferPlan.assign_writers``): a join along dim 0 each holder its own part in
place, anything else one holder after receiving the others' shards; so a pipeline stage writes its
own layers, and the ranks of a TP group split the writing and send each other only row-parallel
shards. Where some rank cannot see the folder, or a probe finds that bytes several ranks write into
one file do not all arrive, rank 0 writes everything. Rank 0 then checks that the ranks' bytes add up
to every file, names the files, writes the index and config.json and publishes the folder. A rank
whose writing fails keeps driving the transfers to the end, so that no rank waits forever on it;
then every rank raises the first error, and the target is left as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.distributed as dist

from bridge.engine.export import encoded, export_layout, export_tensors, write_carried
from bridge.engine.plan import TransferPlan
from bridge.hf.folder_writer import HFFolderWriter
from bridge.hf.layout import LayoutWriter, ShardLayout
from bridge.mappings import TensorSource
from bridge.runtime.gc_freeze import frozen_heap
from bridge.runtime.rank_errors import describe, raise_everywhere, raise_first, rebuilt
from bridge.runtime.sizes import parse_size
from bridge.runtime.write_errors import as_disk_full

logger = logging.getLogger(__name__)


@frozen_heap()
def write_hf_folder(
    plan: TransferPlan,
    out_dir: str | Path,
    *,
    config: dict,
    side_files: dict[str, Path | str],
    target_dtype: Callable[[str, torch.dtype], torch.dtype],
    check: Callable[[Path], None] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    spread: bool = True,
    encoding=None,
    carried: Mapping[str, TensorSource] | None = None,
    release: Callable[[], None] | None = None,
) -> None:
    """Export the model of ``plan`` into an HF folder at ``out_dir``; all ranks call it, all raise any rank's error.

    ``target_dtype(name, dtype)`` is the dtype each HF tensor is written in; ``check`` runs on the
    finished folder before it is published (see ``HFFolderWriter.finish``); ``spread=False`` makes
    rank 0 write every tensor, as it does with an ``encoding`` (``export.encoded``), which is made
    from whole tensors. Rank 0 also writes the ``carried`` tensors, as they are (``release``: drop
    their source's mapped window after each).
    """
    rank = dist.get_rank()
    error: Exception | None = None
    folder: HFFolderWriter | None = None
    layout: ShardLayout | None = None
    try:
        layout = export_layout(plan, target_dtype, parse_size(max_shard_size), encoding, carried)
        if rank == 0:
            folder = HFFolderWriter(out_dir, layout, overwrite=overwrite)
    except Exception as err:
        error = err
    try:
        raise_first(error)  # a mapping's meta export may fail on some ranks only
    except Exception:
        if folder is not None:
            folder.abort()
        raise
    tmp_dir = [str(folder.tmp_dir) if folder is not None else None]
    dist.broadcast_object_list(tmp_dir, src=0)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, sees_folder(Path(tmp_dir[0])))
    if spread and not all(seen):
        logger.warning(
            "ranks %s cannot see %s (no shared filesystem); rank 0 writes every tensor",
            [r for r, s in enumerate(seen) if not s],
            tmp_dir[0],
        )
    spread = spread and encoding is None and all(seen) and _writes_to_one_file_land(Path(tmp_dir[0]))
    writers = plan.assign_writers(spread=spread)
    sink = folder.shards if folder is not None else LayoutWriter(Path(tmp_dir[0]), layout) if seen[rank] else None
    try:
        for name, tensor in export_tensors(plan, writers, joined=True):
            if error is None:
                try:
                    for stored, value in encoded(encoding, name, tensor.to(target_dtype(name, tensor.dtype))):
                        sink.add(stored, value)
                except Exception as err:
                    error = err
        if rank == 0 and carried and error is None:
            try:
                write_carried(sink, carried, release, encoding)
            except Exception as err:
                error = err
        if sink is not None and error is None:
            try:
                sink.close()
            except Exception as err:
                error = err
    except Exception as err:  # raised by export_tensors after its transfers finished: report it like a write error
        error = error or err
    except BaseException:  # interrupted mid-transfer: other ranks see a broken connection, not a hang
        if sink is not None:
            sink.abort()
        if folder is not None:
            folder.abort()
        raise
    if sink is not None and error is not None:
        sink.abort()
    reports: list | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((describe(error), sink.written_bytes if sink is not None else {}), reports, dst=0)
    if folder is not None:
        failed = next(((r, report) for r, (report, _) in enumerate(reports) if report is not None), None)
        if failed is not None:
            folder.abort()
            error = error or rebuilt(*failed)
        else:
            try:
                folder.finish(config, side_files, check=check, written=[counts for _, counts in reports])
            except Exception as err:  # finish removed its folder
                error = err
    if error is not None and layout is not None:
        error = as_disk_full(error, Path(out_dir), needed=layout.file_bytes)
    raise_everywhere(error, src=0)


def _writes_to_one_file_land(folder: Path) -> bool:
    """Whether a byte each rank writes into one shared file all arrive (all ranks call).

    Ranks write their parts of a shard into the same file; a filesystem that keeps only the last
    writer's copy of a file (some object-store mounts) would lose the others' bytes, so each rank
    writes one byte at its own offset of a probe file, and rank 0 reads them back.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    probe = folder / ".write-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            os.pwrite(fd, bytes([1 + rank % 255]), rank)
            os.fsync(fd)
        finally:
            os.close(fd)
        wrote = True
    except OSError:
        wrote = False
    done: list = [None] * world
    dist.all_gather_object(done, wrote)
    verdict = [all(done)]
    if rank == 0:
        try:
            verdict[0] = verdict[0] and probe.read_bytes()[:world] == bytes(1 + r % 255 for r in range(world))
            probe.unlink(missing_ok=True)  # it must not be published with the folder
        except OSError:
            verdict[0] = False
    dist.broadcast_object_list(verdict, src=0)
    if not verdict[0]:
        logger.warning("bytes written by several ranks into one file in %s did not all arrive; rank 0 writes every tensor", folder)
    return verdict[0]


def sees_folder(folder: Path) -> bool:
    """Whether this rank sees rank 0's temporary folder: its name is random, so only a shared filesystem shows it."""
    try:
        return folder.is_dir()
    except OSError:  # e.g. a parent this rank may not read
        return False
