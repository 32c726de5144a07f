"""Writing an HF folder from a model spread over ranks: the ranks that hold its shards write them.

Rank 0 checks the target and makes the temporary folder (``HFFolderWriter``). When every rank can see
that folder (one machine, or a shared filesystem), each parameter goes to one of the ranks holding
its shards (``TransferPlan.assign_writers``), so a pipeline stage writes its own layers and the ranks
of a TP group split the writing, each into shard files of its own; rank 0 then numbers all the
shards, writes the index and config.json and publishes the folder. Where some rank cannot see the
folder, rank 0 writes everything. A rank whose writing fails keeps driving the transfers to the end,
so that no rank waits forever on it; then every rank raises the first error, and the target is left
as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from bridge.hf_writer import HFFolderWriter, ShardSequenceWriter, WrittenShards, parse_size
from bridge.rank_errors import describe, raise_everywhere, rebuilt
from bridge.transfer import TransferPlan, export_tensors

logger = logging.getLogger(__name__)

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
) -> None:
    """Export the model of ``plan`` into an HF folder at ``out_dir``; all ranks call it, all raise any rank's error.

    ``target_dtype(name, dtype)`` is the dtype each HF tensor is written in; ``check`` runs on the
    finished folder before it is published (see ``HFFolderWriter.finish``); ``spread=False`` makes
    rank 0 write every tensor.
    """
    rank = dist.get_rank()
    max_shard_bytes = parse_size(max_shard_size)
    error: Exception | None = None
    folder: HFFolderWriter | None = None
    if rank == 0:
        try:
            folder = HFFolderWriter(out_dir, max_shard_size=max_shard_bytes, overwrite=overwrite)
        except Exception as err:
            error = err
    raise_everywhere(error, src=0)
    tmp_dir = [str(folder.tmp_dir) if folder is not None else None]
    dist.broadcast_object_list(tmp_dir, src=0)
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, sees_folder(Path(tmp_dir[0])))
    if spread and not all(seen):
        logger.warning("ranks %s cannot see %s (no shared filesystem); rank 0 writes every tensor", [r for r, s in enumerate(seen) if not s], tmp_dir[0])
    writers = plan.assign_writers(spread=spread and all(seen))
    shards: ShardSequenceWriter | None = None
    if rank != 0 and rank in writers.values():
        shards = ShardSequenceWriter(Path(tmp_dir[0]), max_shard_bytes, prefix=f"shard-r{rank}-")
    sink = folder or shards
    written: WrittenShards | None = None
    try:
        for name, tensor in export_tensors(plan, writers, joined=True):
            if error is None:
                try:
                    sink.add(name, tensor.to(target_dtype(name, tensor.dtype)))
                except Exception as err:
                    error = err
        if shards is not None and error is None:
            try:
                written = shards.close()
            except Exception as err:
                error = err
    except Exception as err:  # raised by export_tensors after its transfers finished: report it like a write error
        error = error or err
    except BaseException:  # interrupted mid-transfer: other ranks see a broken connection, not a hang
        if shards is not None:
            shards.abort()
        if folder is not None:
            folder.abort()
        raise
    if shards is not None and error is not None:
        shards.abort()
    reports: list | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object((describe(error), written), reports, dst=0)
    if folder is not None:
        failed = next(((r, report[0]) for r, report in enumerate(reports) if report[0] is not None), None)
        if failed is not None:
            folder.abort()
            error = error or rebuilt(*failed)
        else:
            try:
                folder.finish(config, side_files, check=check, others=[w for _, w in reports[1:] if w is not None])
            except Exception as err:
                error = err
    raise_everywhere(error, src=0)


def sees_folder(folder: Path) -> bool:
    """Whether this rank sees rank 0's temporary folder: its name is random, so only a shared filesystem shows it."""
    try:
        return folder.is_dir()
    except OSError:  # e.g. a parent this rank may not read
        return False
