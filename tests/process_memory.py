"""This process's memory as Linux reports it, for the memory tests' measuring subprocesses."""

from __future__ import annotations


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``, ``RssFile``, …) in bytes."""
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))
