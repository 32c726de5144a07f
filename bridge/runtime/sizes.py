"""Sizes a user writes (``--max-shard-size 5GB``, ``--max-memory 500MiB``), read as bytes."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string such as ``"5GB"`` or ``"500MiB"``; refuses anything below one byte."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read the size {size!r}; write it like '5GB' or '500MB'")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise ValueError(f"the size {size!r} must be at least one byte")
    return value
