"""Bounds on "nothing hangs" that stretch with how busy the machine is right now (a shared CI runner), so that a
correct build never fails for being slow, while a real hang still ends."""

import os
import time

MAX_STRETCH = 40.0  # a bound never grows past 40x its quiet value


def contention() -> float:
    """How many times slower than a free core this process runs now: max(1, the 1-minute load per core, the wall time
    of a short CPU-bound loop over its CPU time)."""
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        load = 1.0
    wall, cpu = time.perf_counter(), time.process_time()
    total = 0
    while time.process_time() - cpu < 0.02:  # 20 ms of this process's CPU time
        total += sum(range(200))
    ratio = (time.perf_counter() - wall) / max(time.process_time() - cpu, 1e-6)
    return max(1.0, load, ratio)


def allowed(seconds: float) -> float:
    """`seconds` on a quiet machine, stretched by the contention measured now (at most MAX_STRETCH times)."""
    return seconds * min(MAX_STRETCH, contention())
