"""One error, every rank: a rank that fails tells the others, so that none waits for it in a collective."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

T = TypeVar("T")

# Errors a rank rebuilds from another rank's message with their own type (the rest become RuntimeError).
_REBUILT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def raise_everywhere(error: Exception | None, src: int) -> None:
    """Raise ``error`` (known on rank ``src`` only) on every rank: the original there, a copy elsewhere."""
    message: list = [describe(error)]
    dist.broadcast_object_list(message, src=src)
    if error is not None:
        raise error
    if message[0] is not None:
        raise rebuilt(src, message[0])


def on_rank0(fn: Callable[[], T], share: bool = True) -> T | None:
    """``fn()`` on global rank 0 alone, its error raised on every rank; with ``share``, its result returned on every rank.

    Without a process group (one plain process) it is just ``fn()``.
    """
    if not dist.is_initialized():
        return fn()
    result: list = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            result = [fn()]
        except Exception as err:
            error = err
    raise_everywhere(error, src=0)
    if share:
        dist.broadcast_object_list(result, src=0)
    return result[0] if share or dist.get_rank() == 0 else None


def raise_first(error: Exception | None) -> None:
    """Raise on every rank the error of the lowest rank that has one (the original there, a copy elsewhere)."""
    described: list = [None] * dist.get_world_size()
    dist.all_gather_object(described, describe(error))
    failed = next(((rank, found) for rank, found in enumerate(described) if found is not None), None)
    if failed is not None:
        raise error if failed[0] == dist.get_rank() else rebuilt(*failed)


def describe(error: BaseException | None) -> tuple[type, str, tuple | None] | None:
    """What another rank needs to rebuild ``error``: its type, message and, for an OSError, its errno, text and file (None for no error)."""
    if error is None:
        return None
    os_args = (error.errno, error.strerror, error.filename) if isinstance(error, OSError) and error.errno is not None else None
    return type(error), str(error), os_args


def rebuilt(rank: int, described: tuple[type, str, tuple | None]) -> Exception:
    """The error rank ``rank`` described, as this rank raises it (an OSError keeps its errno: the CLI tells a full disk by it)."""
    kind, text, os_args = described
    if issubclass(kind, _REBUILT_ERRORS):
        try:
            return kind(*os_args) if os_args else kind(text)
        except TypeError:  # a subclass that wants more than a message
            pass
    return RuntimeError(f"rank {rank} failed: {kind.__name__}: {text}")
