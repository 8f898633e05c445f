"""Measurement helpers shared by the benchmark scripts: peak memory, CPU contention on a shared machine, tables.

The 2-core machines these scripts run on are shared: another busy process can slow a 2-thread OpenMP run several-fold.
`CpuMeter` measures the wall time of a block and the share of the machine's CPUs that *other* processes used meanwhile,
and `wait_for_idle_machine` waits, within a bound, for that share to drop before a timed run.
"""

import os
import resource
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


PROC_STAT = Path("/proc/stat")


def peak_rss_mb() -> float:
    """
    Peak resident memory of this process image in MB: `VmHWM` from `/proc/self/status`. Unlike `ru_maxrss`, which
    Linux carries over `execve`, it does not count the memory of the parent a subprocess was forked from.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have been busy (user, nice, system, irq, softirq, steal)."""
    fields = [int(value) for value in PROC_STAT.read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class CpuMeter:
    """
    Wall time of a `with` block, this process's CPU use, and the share of the machine's CPUs that other processes used
    meanwhile (`foreign_load`, 0 where `/proc/stat` is missing).

    Attributes (set on exit):
        seconds (`float`): wall time of the block.
        own_cpu_utilization (`float`): CPU seconds of this process (and its waited-for children) per wall second.
        foreign_load (`float`): CPU seconds of other processes per wall second and CPU, in [0, 1].
    """

    def __enter__(self) -> "CpuMeter":
        self._has_proc_stat = PROC_STAT.exists()
        self._busy = machine_busy_seconds() if self._has_proc_stat else 0.0
        self._own = own_cpu_seconds()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.seconds = time.perf_counter() - self._start
        own = own_cpu_seconds() - self._own
        self.own_cpu_utilization = own / self.seconds if self.seconds > 0 else 0.0
        self.foreign_load = 0.0
        if self._has_proc_stat and self.seconds > 0:
            foreign = max(machine_busy_seconds() - self._busy - own, 0.0)
            # `/proc/stat` counts whole clock ticks, so a fully busy machine can read a little over 1.
            self.foreign_load = min(foreign / (self.seconds * (os.cpu_count() or 1)), 1.0)
        return False


def wait_for_idle_machine(max_foreign_load: float, max_wait_seconds: float, window_seconds: float = 1.0) -> float:
    """
    Wait until other processes use less than `max_foreign_load` of the machine's CPUs over `window_seconds` (this
    process sleeps meanwhile), for at most `max_wait_seconds`. Returns the seconds waited.
    """
    if not PROC_STAT.exists():
        return 0.0
    start = time.perf_counter()
    while True:
        busy_before = machine_busy_seconds()
        time.sleep(window_seconds)
        load = (machine_busy_seconds() - busy_before) / (window_seconds * (os.cpu_count() or 1))
        waited = time.perf_counter() - start
        if load < max_foreign_load or waited >= max_wait_seconds:
            return waited


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """
    A Markdown table. `align` has one letter per column, `l` or `r`; by default the first column is left-aligned and
    the others right-aligned (numbers). Cells are written with `str()`, so format numbers before passing them.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"`align` has {len(align)} letters for {len(header)} columns.")
    if set(align) - {"l", "r"}:
        raise ValueError(f"`align` letters must be `l` or `r`, got {align!r}.")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"A row has {len(row)} cells for {len(header)} columns: {row!r}.")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


__all__ = [
    "CpuMeter",
    "machine_busy_seconds",
    "markdown_table",
    "own_cpu_seconds",
    "peak_rss_mb",
    "wait_for_idle_machine",
]
