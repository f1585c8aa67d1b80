"""Which ranks sit blocked: every thread asleep and (almost) no CPU used for a while, read from Linux's /proc.

A rank waiting in a collective for a peer that failed sleeps in C++ and uses no CPU beyond its parent watch's
twice-a-second look; a rank still on its way to report its own error is running or runnable (it, or the thread that
sends its reply).  RankPool ends the grace it gives the other ranks after a failure once every one of them has
looked blocked for a while.
"""

from __future__ import annotations

import os

__all__ = ["IdleWatch"]


def _cpu_if_asleep(pid: int) -> int | None:
    """pid's CPU time (user + system, clock ticks) if every one of its threads sleeps interruptibly, else None
    (running, runnable, in uninterruptible I/O, gone, or no /proc)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "S":
                    return None
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
IDLE_SHARE = 0.05  # at most this share of one core used while "blocked" (a computing rank uses ~1)


class IdleWatch:
    """`blocked(pids, now)`: True once every pid has been asleep, using at most IDLE_SHARE of a core, for `settle_s`
    seconds."""

    def __init__(self, settle_s: float = 1.0):
        self.settle_s = settle_s
        self._since: dict[int, tuple[int, float]] = {}  # pid -> (CPU time when first seen asleep, when)

    def blocked(self, pids, now: float) -> bool:
        """Whether every process in pids has stayed asleep, using at most IDLE_SHARE of a core, for settle_s up to
        `now` (monotonic seconds); False for no pids."""
        all_settled = bool(pids)
        for pid in pids:
            cpu = _cpu_if_asleep(pid)
            seen = self._since.get(pid)
            if cpu is None or seen is None or cpu - seen[0] > 1 + IDLE_SHARE * _TICKS * (now - seen[1]):
                self._since.pop(pid, None)
                if cpu is not None:
                    self._since[pid] = (cpu, now)
                all_settled = False
            elif now - seen[1] < self.settle_s:
                all_settled = False
        return all_settled
