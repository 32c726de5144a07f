"""Export: HF tensors made from the shards of each parameter, at the rank that writes them.

Each exported parameter has one writing rank (rank 0, or one of the ranks holding its shards, see
``TransferPlan.assign_writers``); the other holders send it their shards, and it turns them back
into HF tensors. A ``COWRITTEN`` parameter moves nothing: each holder gets the HF tensors with its
own parts real and the others' as meta tensors, to write its parts in place.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from bridge.engine.plan import COWRITTEN, PlanEntry, TransferPlan, meta_shard, progress
from bridge.hf.layout import ShardLayout
from bridge.mappings import JoinedShards, TensorSource, materialize


@dataclass
class _Incoming:
    """An exported parameter this rank writes: its shards, some of them still arriving."""

    entry: PlanEntry
    shards: list[torch.Tensor]
    receives: list  # the irecv works of the shards still arriving
    buffers: list[torch.Tensor]  # the shards received into ``_ReceiveBuffers``

    @property
    def received_bytes(self) -> int:
        return sum(buffer.nbytes for buffer in self.buffers)


class _ReceiveBuffers:
    """Memory for received shards, reused from one parameter to the next and zero-filled when new.

    Buffers are reused only where the consumer is done with a parameter's tensors before it asks
    for the next one; all of them together stay under ``limit`` bytes (the free ones are dropped
    first). Why not plain fresh tensors: docs/design.md, "Receiving shards during a parallel export".
    """

    def __init__(self, limit: int, device: torch.device, reuse: bool):
        self.limit = limit
        self.device = device
        self.reuse = reuse
        self.free: dict[int, list[torch.Tensor]] = {}
        self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        stack = self.free.get(nbytes)
        if stack:
            raw = stack.pop()
            if not stack:
                del self.free[nbytes]
        else:
            while self.allocated + nbytes > self.limit and self.free:
                size = max(self.free)
                self.free[size].pop()
                if not self.free[size]:
                    del self.free[size]
                self.allocated -= size
            raw = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
            self.allocated += nbytes
        return raw.view(dtype).view(shape)

    def give(self, tensors: list[torch.Tensor]) -> None:
        if self.reuse:
            for tensor in tensors:
                self.free.setdefault(tensor.nbytes, []).append(tensor.reshape(-1).view(torch.uint8))


def export_layout(
    plan: TransferPlan,
    target_dtype: Callable[[str, torch.dtype], torch.dtype] | None,
    max_shard_bytes: int,
    encoding=None,
    carried: Mapping[str, TensorSource] | None = None,
) -> ShardLayout:
    """The safetensors files an export of ``plan`` fills: its HF tensors in the order it makes them, in ``target_dtype(name, dtype)``,
    stored as ``encoding`` says (``encoded``); then the ``carried`` tensors (``ModelBridge.hf_carried``), as they are."""
    pick = target_dtype or (lambda name, dtype: dtype)
    typed = [(name, tensor.to(pick(name, tensor.dtype))) for name, tensor in plan.exported_meta()]
    stored = [pair for name, tensor in typed for pair in (encoding.meta(name, tensor) if encoding else [(name, tensor)])]
    kept = [(name, torch.empty(source.shape, dtype=source.dtype, device="meta")) for name, source in (carried or {}).items()]
    kept = [pair for name, tensor in kept for pair in (encoding.meta(name, tensor) if encoding else [(name, tensor)])]
    return ShardLayout(stored + kept, max_shard_bytes)


def write_carried(sink, carried: Mapping[str, TensorSource], release: Callable[[], None] | None = None, encoding=None) -> None:
    """Each carried tensor read whole from its source and written as it is (as ``encoding`` stores it: an FP8
    source's weights back in FP8), one at a time (``release``: drop the source's mapped window after each)."""
    for name, source in carried.items():
        tensor = source.narrow(0, 0, source.shape[0]) if len(source.shape) else source.select_slice(())
        for stored, value in encoded(encoding, name, tensor):
            sink.add(stored, value)
        del tensor
        if release is not None:
            release()


def encoded(encoding, name: str, tensor: torch.Tensor | JoinedShards) -> list[tuple[str, torch.Tensor | JoinedShards]]:
    """The tensors an export writes for the HF tensor ``name``: itself, or what ``encoding`` stores it as
    (``bridge.hf.mxfp4_experts.Mxfp4Encoding``: MXFP4 blocks and scales)."""
    return [(name, tensor)] if encoding is None else encoding.encode(name, tensor)


def export_tensors(
    plan: TransferPlan, writers: Mapping[str, int] | None = None, joined: bool = False
) -> Iterator[tuple[str, torch.Tensor | JoinedShards]]:
    """HF (name, tensor) pairs; every rank must drive it to the end, and each gets the pairs it writes.

    Pairs come in global order, except that a parameter whose shards are all at hand goes ahead of
    one whose shards are still arriving.

    ``writers`` names each parameter's writing rank (``TransferPlan.assign_writers``); by default rank
    0 writes everything. With ``joined``, a tensor made of several shards comes as ``JoinedShards``
    (for a writer that writes the parts one after another) instead of being joined into a copy, and
    a pair is valid only until the next one is asked for: its memory is reused. A ``COWRITTEN``
    parameter (``joined`` only) comes to each of its holders, with the other holders' parts as meta
    tensors: each writes its own.

    The holders of a parameter's shards send them straight to its writer, point-to-point (faster
    than a collective ``gather``: docs/design.md). Every rank posts
    its sends and receives in the one global order, so that NCCL's in-order streams pair them up.
    Sends go out at once (they are the parameters themselves, no copies); receives run ahead of the
    writing within a window of the most bytes one parameter needs received (half the largest
    parameter at TP2), so that the next parameters arrive while this one is written, and parameters
    that wait for nothing (held here, or ``COWRITTEN``) are written while one arrives. Memory beyond
    the model: twice the window (the receive buffers, in flight or kept for reuse), plus one joined
    copy unless ``joined``.
    """
    rank = dist.get_rank()
    exported = plan.exported_entries()
    writers = writers or {entry.name: 0 for entry in exported}
    if not joined and COWRITTEN in writers.values():
        raise ValueError("co-written parameters come with meta parts, as JoinedShards: pass joined=True")
    on_gpu = torch.cuda.is_available() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    window = max((plan.received_bytes(entry, writers[entry.name]) for entry in exported), default=0)
    buffers = _ReceiveBuffers(2 * window, device, reuse=joined)
    queue: deque[_Incoming] = deque()
    sends: list = []
    failures: list[Exception] = []  # conversion errors, raised once every transfer is done
    queued_bytes = 0

    def post(tag: int, entry: PlanEntry) -> None:
        nonlocal queued_bytes
        writer, holders = writers[entry.name], plan.shard_holders(entry)
        if writer == COWRITTEN:  # each holder converts its own shard, the others' as meta stand-ins, and writes its parts
            own = [_local_tensor(plan, entry) if holder == rank else meta_shard(entry) for holder in holders]
            queue.append(_Incoming(entry, own, [], []))
            return
        if rank in holders and rank != writer:
            sends.append(dist.isend(_local_tensor(plan, entry), dst=writer, tag=tag))
        if rank == writer:
            incoming = _Incoming(entry, [], [], [])
            for holder in holders:
                if holder == rank:
                    incoming.shards.append(_local_tensor(plan, entry))
                    continue
                shard = buffers.take(entry.local_shape, entry.dtype)
                incoming.receives.append(dist.irecv(shard, src=holder, tag=tag))
                incoming.buffers.append(shard)
                incoming.shards.append(shard)
            queue.append(incoming)
            queued_bytes += incoming.received_bytes

    def write(index: int) -> Iterator[tuple[str, torch.Tensor | JoinedShards]]:
        nonlocal queued_bytes
        incoming = queue[index]
        del queue[index]
        for work in incoming.receives:
            work.wait()
        try:
            converted = plan.mapping(incoming.entry).megatron_to_hf(incoming.shards, plan.context(incoming.entry, 0))
        except Exception as err:  # keep the transfers going, so that no other rank waits for this one
            failures.append(err)
            converted = {}
        incoming.shards = []
        for name, tensor in converted.items():
            yield name, tensor if joined else materialize(tensor)
        del converted
        buffers.give(incoming.buffers)
        queued_bytes -= incoming.received_bytes

    def ready() -> int | None:
        """The oldest queued parameter whose shards are all here, if any."""
        return next((i for i, incoming in enumerate(queue) if all(work.is_completed() for work in incoming.receives)), None)

    steps = [(tag, entry) for tag, entry in enumerate(exported) if rank == writers[entry.name] or rank in plan.shard_holders(entry)]
    for tag, entry in progress(steps, "exporting"):
        need = plan.received_bytes(entry, rank) if rank == writers[entry.name] else 0
        while queue and queued_bytes + need > window:  # room for this parameter's receives
            yield from write(0)
        post(tag, entry)
        while (index := ready()) is not None:  # write what waits for nothing, even past a parameter still arriving
            yield from write(index)
    while queue:
        yield from write(0)
    for work in sends:
        work.wait()
    if failures:
        raise failures[0]


def _local_tensor(plan: TransferPlan, entry: PlanEntry) -> torch.Tensor:
    return plan.local[entry.name].param.detach().contiguous()
