"""Ctrl-C ends RankPool, run_on_ranks and a pytest run within 5 s, and no worker outlives its parent.

Real processes and real gloo ranks.  Each case starts a script in its own session (so that SIGINT can go
to its whole process group, as a terminal's Ctrl-C does), waits until every rank is inside a task that
blocks in C++ (a recv from a peer that never sends, which no Python-level signal reaches), then signals
it.  Only the time from the signal to the exit is held to 5 s; the startup may take long on a busy machine.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.slowness import allowed

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc to find the workers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_S = 60.0  # spawning ranks costs ~6 s on an idle machine; stretched by the load (tests.slowness)
EXIT_S = 10.0  # 0.4-2 s on a quiet machine (interpreter teardown with torch loaded); stretched by the load

TASK = '''
import faulthandler, os, signal, sys, time
import torch, torch.distributed as dist

faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks where it is stuck when it does not exit

def block(marker_dir):
    """Write this rank's pid, then wait in C++ for a message no peer ever sends."""
    path = os.path.join(marker_dir, f"{dist.get_world_size()}-{dist.get_rank()}.pid")
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    dist.recv(torch.zeros(1), src=(dist.get_rank() + 1) % dist.get_world_size())
'''

SCRIPT = TASK + '''
from dtp.testing import RankPool, run_on_ranks

if __name__ == "__main__":
    marker_dir = os.environ["DTP_TEST_MARKERS"]
    if sys.argv[1] == "pool":
        with RankPool(2, timeout=1800, pg_timeout=1800) as pool:  # no case bound may end it before the signal does
            pool.run(block, marker_dir)
    else:
        run_on_ranks(block, 2, marker_dir, timeout=1800)
'''

TEST_FILE = TASK + '''
MARKERS = os.environ["DTP_TEST_MARKERS"]

def test_blocks(pools):
    pools.run(2, block, MARKERS)
'''

# Beside the pytest run's test file: when and where its exit after Ctrl-C spends its time (a busy machine's failures)
TIMELINE_CONFTEST = '''
import faulthandler, os, time

TIMELINE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "timeline.txt"), "a", buffering=1)
T0 = time.monotonic()


def mark(what):
    TIMELINE.write(f"{time.monotonic() - T0:8.2f} s  {what}\\n")


def pytest_keyboard_interrupt(excinfo):
    mark("KeyboardInterrupt reached pytest; every thread's stack follows every 5 s until the process exits")
    faulthandler.dump_traceback_later(5, repeat=True, file=TIMELINE)


def pytest_sessionfinish(session):
    mark("pytest_sessionfinish")


def pytest_unconfigure(config):
    mark("pytest_unconfigure")
'''


def _stat(pid):
    """(state, process group, start time) of pid, or None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[2]), fields[19])


def _group(pgid):
    """{pid: start time} of the live processes in process group pgid."""
    members = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) and st[1] == pgid:
            members[int(name)] = st[2]
    return members


def _survivors(procs, wait_s=3.0):
    """The processes of {pid: start time} still alive after up to wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid, start in procs.items() if (st := _stat(pid)) and st[2] == start]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


# A terminal's program starts with SIGINT at its default.  A suite run in the background of a script or under nohup
# inherits SIGINT ignored, and a Python started so never installs KeyboardInterrupt: reset it, then exec the command.
AS_FROM_A_TERMINAL = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")


def _launch(cmd, tmp_path):
    """Start cmd in a new session with SIGINT at its default, as a terminal starts it, and a fresh marker directory for
    its ranks; return (proc, log, markers)."""
    markers = tmp_path / "markers"
    markers.mkdir()
    log = open(tmp_path / "log.txt", "w+")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "DTP_TEST_MARKERS": str(markers)}
    proc = subprocess.Popen([sys.executable, "-c", AS_FROM_A_TERMINAL, *cmd], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, markers


def _wait_blocked(proc, log, markers, n_markers=2):
    """The worker pids once n_markers ranks of the launched cmd are blocked."""
    start, bound, checked = time.monotonic(), allowed(STARTUP_S), time.monotonic()
    while len([f for f in os.listdir(markers) if f.endswith(".pid")]) < n_markers:
        if time.monotonic() - checked > 2:  # the ranks it starts load the machine too: measure again as they come up
            bound, checked = max(bound, allowed(STARTUP_S)), time.monotonic()
        if proc.poll() is not None or time.monotonic() - start > bound:
            _kill_group(proc)
            log.seek(0)
            output = log.read()[-3000:]
            log.close()
            pytest.fail(f"the ranks never blocked (exit {proc.returncode}):\n{output}")
        time.sleep(0.1)
    time.sleep(0.5)  # let the ranks get into their recv
    pids = [int((markers / f).read_text()) for f in os.listdir(markers) if f.endswith(".pid")]
    return proc, log, pids


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """Every script of this module, started at once (their startups overlap; blocked ranks use no CPU)."""
    runs = {}
    for name in ("pool", "run_on_ranks", "pytest", "parent killed"):
        tmp_path = tmp_path_factory.mktemp(name.replace(" ", "_"))
        if name == "pytest":
            (tmp_path / "test_blocked.py").write_text(TEST_FILE)
            (tmp_path / "conftest.py").write_text(TIMELINE_CONFTEST)
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                   "--rootdir", str(tmp_path), str(tmp_path / "test_blocked.py")]
        else:
            (tmp_path / "script.py").write_text(SCRIPT)
            cmd = [sys.executable, str(tmp_path / "script.py"), "run_on_ranks" if name == "run_on_ranks" else "pool"]
        runs[name] = _launch(cmd, tmp_path)
    yield runs
    for proc, log, _ in runs.values():
        _kill_group(proc)
        log.close()


def _kill_group(proc):
    """SIGKILL whatever is left of proc's process group (cleanup, also when a check failed) and reap proc."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _interrupt_and_check(proc, log, pids):
    """SIGINT to the whole group, as Ctrl-C does; assert exit within EXIT_S and that nothing in the group survives."""
    group = _group(proc.pid)
    assert set(pids) <= set(group), f"workers {pids} are not in the script's process group {sorted(group)}"
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=allowed(EXIT_S) + 25)
    except subprocess.TimeoutExpired:
        pass
    elapsed, bound = time.monotonic() - start, allowed(EXIT_S)  # one measure: the timeline is quoted only on failure
    if proc.returncode is None:  # where is it stuck?  each script dumps every thread's stack on SIGUSR1
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(2)
    try:
        log.seek(0)
        output = log.read()[-8000:]
        timeline = os.path.join(os.path.dirname(log.name), "timeline.txt")
        if os.path.exists(timeline) and (proc.returncode is None or elapsed >= bound):  # failing: say where
            with open(timeline) as f:
                output += f"\n--- the run's timeline after the signal ---\n{f.read()[-12000:]}"
        assert proc.returncode is not None, f"still running {elapsed:.1f} s after one SIGINT:\n{output}"
        assert elapsed < bound, f"took {elapsed:.1f} s to exit after SIGINT:\n{output}"
        assert "KeyboardInterrupt" in output, output
        left = _survivors({pid: began for pid, began in group.items() if pid != proc.pid}, wait_s=allowed(3.0))
        assert not left, f"processes {left} (workers {pids}) outlived the interrupted run:\n{output}"
    finally:
        _kill_group(proc)
        log.close()
    return output


def test_ctrl_c_stops_a_rank_pool_at_once(started):
    """`with RankPool(2) as pool: pool.run(...)` with both ranks stuck in a recv: one SIGINT ends it all."""
    _interrupt_and_check(*_wait_blocked(*started["pool"]))


def test_ctrl_c_stops_run_on_ranks_at_once(started):
    """The launcher, run_on_ranks, with both ranks stuck in a recv: one SIGINT ends it all."""
    _interrupt_and_check(*_wait_blocked(*started["run_on_ranks"]))


def test_ctrl_c_stops_pytest_with_the_session_pools(started):
    """The suite's own conftest (all session pools) under a pytest run interrupted mid-test."""
    proc, log, pids = _wait_blocked(*started["pytest"])
    output = _interrupt_and_check(proc, log, pids)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output


def test_workers_exit_when_their_parent_is_killed(started):
    """SIGKILL to the parent alone (no cleanup can run there): the ranks notice and exit by themselves."""
    proc, log, pids = _wait_blocked(*started["parent killed"])
    workers = {pid: st[2] for pid in pids if (st := _stat(pid))}
    try:
        assert len(workers) == 2, f"workers {pids} not running"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = _survivors(workers, wait_s=allowed(EXIT_S))
        assert not left, f"workers {left} outlived their killed parent by {EXIT_S} s"
    finally:
        _kill_group(proc)
