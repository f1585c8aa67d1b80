"""Session-wide rank pools: one set of gloo workers per world size, started once and reused."""

import pytest

from dtp.testing import RankPool, preload_in_workers

# The workers fork from a server that imported these once (a missing one is skipped): ~2 s less per worker started.
preload_in_workers("transformers.modeling_utils", "peft", "hypothesis")

WORLD_SIZES = (1, 2, 3, 4)
# A case that hangs still ends, but a slow one on a busy runner (an inductor compile at load 30) never fails: 10
# minutes per case, and collectives that wait as long for a slow peer (a failing rank ends the others at once anyway).
CASE_TIMEOUT_S, COLLECTIVE_TIMEOUT_S = 600.0, 600.0


class RankPools:
    """`pools.run(world_size, fn, *args)` runs fn on that many ranks; all pools start together on first use."""

    def __init__(self):
        self._pools = {}

    def run(self, world_size, fn, *args, **kwargs):
        """Run fn on `world_size` ranks of the session pool of that size and return the results by rank."""
        if not self._pools:
            for ws in WORLD_SIZES:  # spawn every size at once: the startup costs overlap
                self._pools[ws] = RankPool(ws, timeout=CASE_TIMEOUT_S, pg_timeout=COLLECTIVE_TIMEOUT_S).start()
        if world_size not in self._pools:
            self._pools[world_size] = RankPool(world_size, timeout=CASE_TIMEOUT_S, pg_timeout=COLLECTIVE_TIMEOUT_S).start()
        return self._pools[world_size].run(fn, *args, **kwargs)

    def close(self):
        """Stop every pool: idle ones politely, and all that are left at once if interrupted (a second Ctrl-C)."""
        pools = list(self._pools.values())
        try:
            for pool in pools:
                pool.stop()
            for pool in pools:
                pool.close()
        finally:
            for pool in pools:
                pool.kill()


@pytest.fixture(scope="session")
def pools():
    p = RankPools()
    try:
        yield p
    finally:  # pytest tears session fixtures down on Ctrl-C too; this also covers a generator closed early
        p.close()


def pytest_collection_finish(session):
    """test_launch's torchrun jobs (real processes, ~80 s of CPU) start now if it will run: they overlap with the
    tests before it instead of running alone."""
    if any(item.nodeid.startswith("tests/test_launch.py::") for item in session.items):
        from tests import test_launch

        test_launch.start_jobs()


def pytest_sessionfinish(session):
    """No torchrun job outlives the session (they run in sessions of their own, which a Ctrl-C does not reach)."""
    import sys

    if "tests.test_launch" in sys.modules:
        sys.modules["tests.test_launch"].kill_jobs()
