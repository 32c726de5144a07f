"""``--max-memory`` as bytes, and its default: a share of the memory this process may still take.

The default is ``DEFAULT_SHARE`` of the available memory: the kernel's ``MemAvailable``, or less
where the process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, at its own level or
any above) leaves less room: its limit less what the group uses, counting its inactive file pages
as free, as the kernel reclaims them first. No torch import: ``hfmb --help`` reads this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bridge.runtime.sizes import parse_size
from bridge.runtime.write_errors import size_text

DEFAULT_SHARE = 0.6
# The default where the system does not tell its available memory (no /proc/meminfo).
FALLBACK = "4GB"
# A cgroup v1 "limit" at or above this is the kernel's way of saying there is none.
_NO_LIMIT = 2**60


@dataclass(frozen=True)
class MemoryBudget:
    """A conversion's memory budget and how a report names it."""

    bytes: int
    text: str  # "--max-memory 4GB", or "--max-memory 13.2 GiB (default: 60% of the 22.0 GiB of available memory)"


@dataclass(frozen=True)
class CgroupMemory:
    """One cgroup level's memory limit, usage and inactive file pages (bytes)."""

    limit: int
    usage: int
    inactive_file: int = 0

    @property
    def room(self) -> int:
        """What the group still lets its processes take: the limit, less what is used and not cheaply reclaimed."""
        return max(0, min(self.limit, self.limit - self.usage + self.inactive_file))


def memory_budget(max_memory: int | str | None) -> MemoryBudget:
    """``max_memory`` (a size, as given), or the default computed from this machine's memory now."""
    if max_memory is not None:
        return MemoryBudget(parse_size(max_memory), f"--max-memory {max_memory}")
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:  # not Linux
        return MemoryBudget(parse_size(FALLBACK), f"--max-memory {FALLBACK} (default where the available memory is not known)")
    return default_budget(available_memory(meminfo, cgroup_limits()))


def default_budget(available: int) -> MemoryBudget:
    """``DEFAULT_SHARE`` of ``available`` bytes, named as the default."""
    chosen = int(available * DEFAULT_SHARE)
    text = f"--max-memory {size_text(chosen)} (default: {DEFAULT_SHARE:.0%} of the {size_text(available)} of available memory)"
    return MemoryBudget(chosen, text)


def available_memory(meminfo: str, cgroups: list[CgroupMemory]) -> int:
    """The bytes this process may still take: ``meminfo``'s ``MemAvailable`` (``/proc/meminfo``), or what ``cgroups`` leave if less."""
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if match is None:  # kernels before 3.14: free memory and page cache, roughly what MemAvailable estimates
        fields = dict(re.findall(r"^(\w+):\s+(\d+)\s*kB", meminfo, re.MULTILINE))
        available = sum(int(fields.get(name, 0)) for name in ("MemFree", "Cached", "Buffers")) * 1024
    else:
        available = int(match.group(1)) * 1024
    return min([available, *(group.room for group in cgroups)])


def cgroup_limits(mount: str | Path = "/sys/fs/cgroup", membership: str | Path = "/proc/self/cgroup") -> list[CgroupMemory]:
    """The memory limits set on this process's cgroup and the groups above it (v2 or v1); empty where none is set or readable."""
    mount = Path(mount)
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        lines = []
    found: list[CgroupMemory] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            found += _levels(mount, path, _v2_level)
        elif "memory" in controllers.split(","):
            found += _levels(mount / "memory", path, _v1_level)
    if not found:  # a cgroup namespace mounts the process's own group at the root
        found += [level for level in (_v2_level(mount), _v1_level(mount / "memory")) if level is not None]
    return found


def _levels(root: Path, path: str, read) -> list[CgroupMemory]:
    """The limited levels from the group at ``path`` up to ``root``: each level's limit applies to everything below it."""
    levels = []
    folder = root / path.strip("/")
    while True:
        level = read(folder)
        if level is not None:
            levels.append(level)
        if folder == root or root not in folder.parents:
            return levels
        folder = folder.parent


def _v2_level(folder: Path) -> CgroupMemory | None:
    limit = _read(folder / "memory.max")
    if limit is None or limit == "max":
        return None
    return CgroupMemory(int(limit), int(_read(folder / "memory.current") or 0), _stat(folder / "memory.stat", "inactive_file"))


def _v1_level(folder: Path) -> CgroupMemory | None:
    limit = _read(folder / "memory.limit_in_bytes")
    if limit is None or int(limit) >= _NO_LIMIT:
        return None
    usage = int(_read(folder / "memory.usage_in_bytes") or 0)
    return CgroupMemory(int(limit), usage, _stat(folder / "memory.stat", "total_inactive_file"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def _stat(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0
