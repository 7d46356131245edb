"""How much memory a run's data may take (--memory-budget), and which pipeline that picks.

A data set whose decoded images fit the budget is held in memory (the fastest epochs);
a larger one is streamed from the decoded-image cache on disk (engine.stream), with
memory that does not grow with the data. The default budget, `auto`, is AUTO_SHARE of
the memory this process may still use: the smaller of the machine's MemAvailable and
what its cgroup's limit leaves (v2 `memory.max`, v1 `memory.limit_in_bytes`, of the
process's own group and every group above it), so a container or a pod with a memory
limit streams as soon as its data would not fit, without a flag.

Standard library only: engine.config validates the flag with parse_size, and the host
side imports engine.config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

AUTO_SHARE = 0.5  # of the memory left to the process; the rest is the model's and TF's
# Peak memory of the in-memory pipeline per decoded byte while it is built: the decoded
# array, its tensor, the splits gathered from it (doc/benchmarks.md, "Larger than memory").
MEMORY_PATH_FACTOR = 2.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP, MEMINFO = Path("/proc/self/cgroup"), Path("/proc/meminfo")
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """A memory size -> bytes; None for `auto`.

    Accepts a number of bytes (`1000000`), or a number with K, M, G or T, alone or
    followed by B or iB, all powers of 1024 (`512M`, `4G`, `2GiB`, `1.5gb`); `0` means
    always stream.

    Raises:
        ValueError: anything else, with what would be accepted.
    """
    value = str(text).strip()
    if value.lower() == "auto":
        return None
    match = _SIZE.match(value)
    if not match:
        raise ValueError(
            f"memory_budget must be auto or a size such as 4G, 512M, 2GiB or 0 (always "
            f"stream from the disk cache), got '{text}'"
        )
    return int(float(match[1]) * _UNITS[match[2].lower()])


def format_size(size: float) -> str:
    """Bytes -> a short text in GB or MB, as the console prints sizes."""
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(group: Path, key: str) -> int:
    """Page cache the kernel can take back at once (not memory the group must keep)."""
    try:
        for line in (group / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _own_groups() -> list[Path]:
    """The memory cgroup folders of this process and of every group above it.

    /proc/self/cgroup names the group; a container whose cgroup folder is mounted as
    the root (no such path inside) is its own root folder, which is always included.
    """
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    found: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            bases = [CGROUP_ROOT / "memory"]
        elif controllers == "":  # v2: one unified hierarchy
            bases = [CGROUP_ROOT, CGROUP_ROOT / "unified"]
        else:
            continue
        for base in bases:
            parts = Path(path.lstrip("/")).parts
            for depth in range(len(parts), -1, -1):
                group = base.joinpath(*parts[:depth])
                if group.is_dir() and group not in found:
                    found.append(group)
    return found


def cgroup_room() -> int | None:
    """Bytes the process's cgroups still let it use (their smallest limit less their use,
    page cache left out); None where no memory limit is set."""
    room = None
    for group in _own_groups():
        for limit_name, usage_name, cache_key in (
            ("memory.max", "memory.current", "inactive_file"),  # v2
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),  # v1
        ):
            limit = _read_int(group / limit_name)  # v2 "max" reads as None: no limit
            if limit is None or limit >= NO_LIMIT:
                continue
            used = (_read_int(group / usage_name) or 0) - _inactive_file(group, cache_key)
            left = max(limit - max(used, 0), 0)
            room = left if room is None else min(room, left)
    return room


def mem_available() -> int | None:
    """The machine's MemAvailable (/proc/meminfo) in bytes; None where unknown."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class Plan:
    """Where a run's decoded images are held: `memory` or `stream` (from the disk cache)."""

    pipeline: str
    budget: int  # bytes the data may take in memory (the flag, resolved)
    decoded_bytes: int  # the decoded images' size

    def params(self) -> dict[str, int | str]:
        """The run's params that say what it chose (DataInfo.pipeline_params)."""
        return {
            "data_pipeline": self.pipeline,
            "memory_budget_bytes": self.budget,
            "decoded_bytes": self.decoded_bytes,
        }


def resolve_budget(setting: str) -> int:
    """--memory-budget -> bytes: the size given, or for `auto` AUTO_SHARE of the memory the
    process may still use (MemAvailable and its cgroup's room, the smaller)."""
    size = parse_size(setting)
    if size is not None:
        return size
    known = [room for room in (mem_available(), cgroup_room()) if room is not None]
    return int(AUTO_SHARE * min(known)) if known else NO_LIMIT


def plan_for(setting: str, images: int, image_bytes: int) -> Plan:
    """Hold `images` decoded images of `image_bytes` each in memory, or stream them.

    In memory when the in-memory pipeline's peak (MEMORY_PATH_FACTOR times the decoded
    size) fits the budget; streamed otherwise, and always with a budget of 0.
    """
    budget = resolve_budget(setting)
    decoded = images * image_bytes
    fits = budget > 0 and decoded * MEMORY_PATH_FACTOR <= budget
    return Plan("memory" if fits else "stream", budget, decoded)
