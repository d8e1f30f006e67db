"""How many threads mmchat's matmuls run on, and keeping that right while the machine's load changes.

Every parallel op ends at a barrier where its threads wait for each other. On a CPU that another process also
keeps busy, one of our threads is descheduled now and then, and the others wait for it for a whole time slice
at every barrier: measured on 2 cores with one other busy process, 2 threads decoded at 16 tok/s where 1 thread
did 30 (and at 5 against 72 for a batch of 8 under heavier load). So the thread count is chosen when a model
loads (choose_threads) and then follows the load while generating (follow_load): each half second the CPU time
other processes used on our CPUs is read from /proc/stat, and a core that they keep busy is left to them.
$MMCHAT_THREADS fixes the count, and so does a torch.set_num_threads call of one's own: the count is followed only
while it is the one mmchat set.
"""
from __future__ import annotations

import math
import os
import time

import torch


_ours: int | None = None  # the thread count mmchat itself last set (set_threads)


def set_threads(n: int):
    """Set torch's thread count (which mmchat's kernels use too) and remember that mmchat chose it."""
    global _ours
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _ours = n


def pinned_threads() -> int | None:
    """$MMCHAT_THREADS when it is set to a positive number."""
    value = os.environ.get("MMCHAT_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def physical_cores() -> int:
    """Cores this process may use, hyperthreads counted once (matmuls gain nothing from a second thread on the
    same core)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        per_core = {}
        for block in info.split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "siblings" in fields and "cpu cores" in fields:
                per_core = max(1, int(fields["siblings"]) // max(1, int(fields["cpu cores"])))
                break
        return max(1, usable // (per_core or 1))
    except (OSError, ValueError):
        return usable


def choose_threads() -> int:
    """Threads for matmuls: $MMCHAT_THREADS if set, else the physical cores, but one when the machine is
    already busy (load average above twice the cores): every op ends at a barrier where the threads wait for
    each other, and on a crowded CPU a descheduled thread stalls the rest for a whole time slice (measured
    here: 2 threads at load 13 on 2 cores decode 60x slower than 1)."""
    pinned = pinned_threads()
    if pinned:
        return pinned
    cores = physical_cores()
    try:
        busy = os.getloadavg()[0] > 2 * cores
    except OSError:
        busy = False
    return 1 if busy else cores


def threads_for(cores: int, others: float) -> int:
    """Threads to use on `cores` cores while other processes keep `others` cores' worth of them busy: a core they
    use more than half of the time is theirs."""
    return max(1, cores - math.ceil(others - 0.5)) if others > 0.5 else cores


def _busy_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the given CPUs have spent busy since boot (all processes), from /proc/stat; None where it
    cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq = (int(x) for x in fields[:7])
            ticks += user + nice + system + irq + softirq
    return ticks / os.sysconf("SC_CLK_TCK")


class LoadFollower:
    """Sets torch's thread count (which mmchat's kernels use too) from the load other processes put on our CPUs,
    looking at most every `interval` seconds; see the module's docstring."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.cores = physical_cores()
        self.last: tuple[float, float, float] | None = None  # (wall, busy CPU seconds of all, CPU seconds of ours)
        self.others = 0.0  # cores' worth of CPU other processes used over the last interval

    def __call__(self) -> int:
        """Look at the load (if `interval` has passed) and set the thread count; returns it. Hands off when the
        count was pinned ($MMCHAT_THREADS) or set by someone else than mmchat."""
        if pinned_threads() or self.cores < 2 or torch.get_num_threads() != _ours:
            return torch.get_num_threads()
        now = time.monotonic()
        if self.last is not None and now - self.last[0] < self.interval:
            return torch.get_num_threads()
        busy = _busy_seconds(self.cpus)
        if busy is None:
            return torch.get_num_threads()
        sample = (now, busy, time.process_time())
        if self.last is not None:
            wall, all_busy, ours = (a - b for a, b in zip(sample, self.last))
            self.others = max(0.0, (all_busy - ours) / wall)
            set_threads(threads_for(self.cores, self.others))
        self.last = sample
        return torch.get_num_threads()


follow_load = LoadFollower()  # one per process: the thread count is the process's
