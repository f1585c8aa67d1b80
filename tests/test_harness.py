"""dtp.testing.RankPool: real ranks, reused, failures reported with the rank's traceback, no hangs."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from dtp.testing import RankError, RankPool
from tests.slowness import allowed


def case_sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item(), torch.get_num_threads()


def case_rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.all_reduce(torch.ones(1))  # the others wait here for a rank that never comes


def case_sleep(seconds):
    time.sleep(seconds)


def test_results_by_rank_one_thread_each(pools):
    assert pools.run(3, case_sum_of_ranks) == [(3.0, 1)] * 3


def test_reused_workers_are_fast(pools):
    pools.run(2, case_sum_of_ranks)  # warm
    start = time.perf_counter()
    for _ in range(5):
        pools.run(2, case_sum_of_ranks)
    assert (time.perf_counter() - start) / 5 < allowed(1.0)


def test_failing_rank_reported_and_nobody_hangs():
    with RankPool(3, timeout=600) as pool:
        pool.run(case_sum_of_ranks)  # started: the bound below is on the release, not on spawning 3 ranks
        start = time.perf_counter()
        with pytest.raises(RankError) as info:
            pool.run(case_rank_one_raises)
        assert time.perf_counter() - start < allowed(20), "the waiting ranks were not released"
        assert "rank 1 raised" in str(info.value) and "rank one is unhappy" in str(info.value)
        # the pool restarts itself and works again
        assert [r[0] for r in pool.run(case_sum_of_ranks)] == [3.0] * 3


def test_timeout_is_enforced():
    with RankPool(1, timeout=30) as pool:
        pool.run(case_sum_of_ranks)
        with pytest.raises(RankError, match="gave no answer"):
            pool.run(case_sleep, 60, timeout=2)


def case_rank_fails_inside_a_model(where):
    """A 2-rank TP MLP; rank 1 raises in the middle of the forward (before its all-reduce) or of the backward."""
    import dtp
    from torch import nn

    model = dtp.parallelize_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), None,
                                   {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()})

    def fail(*_):
        if dist.get_rank() == 1:
            raise RuntimeError(f"rank 1 fails mid-{where}")

    if where == "forward":
        model[2].register_forward_pre_hook(fail)  # rank 0 then waits in the row layer's all-reduce
    x = torch.randn(3, 4, requires_grad=True)
    y = model(x)
    if where == "backward":
        y.register_hook(fail)  # rank 0 then waits in the column layer's input-gradient all-reduce
    y.sum().backward()


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_failing_rank_ends_all_ranks_within_ten_seconds(where):
    with RankPool(2, timeout=600, pg_timeout=1800) as pool:  # the process-group timeout alone would wait 30 minutes
        pool.run(case_sum_of_ranks)  # started and warm
        start = time.perf_counter()
        with pytest.raises(RankError) as info:
            pool.run(case_rank_fails_inside_a_model, where)
        elapsed = time.perf_counter() - start
    assert elapsed < allowed(10), f"the peers of a failed rank took {elapsed:.1f} s to end"
    assert f"rank 1 fails mid-{where}" in str(info.value) and "rank 1 raised" in str(info.value)
    assert "ranks [0] were stopped: they waited in a collective for rank(s) [1]" in str(info.value)


@pytest.fixture(scope="module")
def failing_torchrun_jobs():
    """Both torchrun jobs (a rank fails mid-forward / mid-backward), started at once: their startups overlap."""
    from tests.test_launch import Job

    jobs = {where: (time.perf_counter(), Job(["--standalone", "--nproc_per_node", "2",
                                              "tests/torchrun_failing_rank.py", where]))
            for where in ("forward", "backward")}
    yield jobs
    for _, job in jobs.values():
        job.kill()


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_under_torchrun_a_failing_rank_ends_the_job(failing_torchrun_jobs, where):
    """dtp.testing.run_under_torchrun: the failing rank exits at once and torchrun ends the rest (not the PG timeout)."""
    start, job = failing_torchrun_jobs[where]
    code, stdout, stderr = job.wait(timeout=allowed(120))
    elapsed = time.perf_counter() - start
    assert code != 0 and f"rank 1 fails mid-{where}" in stderr, stderr[-2000:]
    assert "rank finished" not in stdout, "a rank went on after its peer failed"
    assert elapsed < allowed(40), f"torchrun took {elapsed:.1f} s (process start included) to end after a rank failed"


def case_environment_and_parent(name):
    import os

    return os.environ.get(name), os.getppid()


def test_workers_see_the_owners_environment_when_the_pool_starts(monkeypatch):
    """Forked from a forkserver started earlier, a worker still sees the owner's environment as it is now."""
    import os

    from dtp.testing import worker_context

    for value in ("first", "second"):  # the second pool forks from the server the first one started
        monkeypatch.setenv("DTP_TEST_VALUE", value)
        with RankPool(2) as pool:
            results = pool.run(case_environment_and_parent, "DTP_TEST_VALUE")
        assert [r[0] for r in results] == [value, value]
        forked = worker_context().get_start_method() == "forkserver"
        assert all((r[1] != os.getpid()) == forked for r in results), (results, os.getpid())


def case_rank_one_aborts():
    """Rank 1 writes a line to its stderr (fd 2, as C++ does) and aborts like a std::terminate in a gloo thread."""
    import os

    os.write(2, f"rank {dist.get_rank()} says hello on fd 2\n".encode())
    if dist.get_rank() == 1:
        os.write(2, b"terminate called after throwing an instance of 'gloo::EnforceNotMet'\n")
        os.abort()
    dist.all_reduce(torch.ones(1))


def test_a_rank_killed_by_a_signal_is_reported_with_the_end_of_its_stderr(capfd):
    """A rank that dies without a traceback (SIGABRT): the error names the signal's exit code and quotes its stderr,
    where faulthandler has written the rank's Python stacks; what the ranks wrote reaches the owner's stderr, rank by
    rank."""
    with RankPool(2, timeout=600) as pool:
        with pytest.raises(RankError) as info:
            pool.run(case_rank_one_aborts)
    message = str(info.value)
    assert "rank 1 died (exit code -6)" in message and "gloo::EnforceNotMet" in message, message
    assert "Fatal Python error: Aborted" in message and "in case_rank_one_aborts" in message, "no Python stack: " + message
    err = capfd.readouterr().err
    assert "[rank 0 of 2, stderr]\nrank 0 says hello on fd 2" in err, err
    assert "[rank 1 of 2, stderr]\nrank 1 says hello on fd 2" in err, err


def case_rank_one_raises_rank_zero_later():
    """Rank 1 raises at once; rank 0 computes for a while (a CPU loop), then raises too."""
    if dist.get_rank() == 1:
        raise ValueError("rank one is first")
    end = time.perf_counter() + 1.5  # wall seconds: past the 1 s a rank must sit blocked, inside the 3 s grace even
    while time.perf_counter() < end:  # on a busy machine (the loop is runnable throughout: never seen as blocked)
        pass
    raise ValueError("rank zero comes later")


def test_the_grace_after_a_failure_waits_for_a_rank_still_computing():
    """The grace the others get after a rank fails ends early only for ranks that sit blocked: one still computing is
    waited for, and its own error is reported too."""
    with RankPool(2, timeout=600) as pool:
        with pytest.raises(RankError) as info:
            pool.run(case_rank_one_raises_rank_zero_later)
    message = str(info.value)
    assert "rank one is first" in message and "rank zero comes later" in message, message


def test_idle_watch_tells_a_blocked_process_from_a_busy_one():
    """dtp.idle_ranks.IdleWatch: a process asleep (as in a collective with a failed peer) is blocked after settle_s of
    looks; one in a CPU loop never is."""
    import subprocess
    import sys

    from dtp.idle_ranks import IdleWatch

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("reads /proc")
    procs = {kind: subprocess.Popen([sys.executable, "-c", code]) for kind, code in
             (("asleep", "import time; time.sleep(60)"), ("busy", "while True: pass"))}
    try:
        watches = {kind: IdleWatch(settle_s=0.5) for kind in procs}
        seen = {kind: False for kind in procs}
        start = time.monotonic()
        while time.monotonic() - start < allowed(3.0) and not seen["asleep"]:
            now = time.monotonic()
            for kind, proc in procs.items():
                seen[kind] = seen[kind] or watches[kind].blocked([proc.pid], now)
            time.sleep(0.1)
        assert seen["asleep"], "a sleeping process was never seen blocked"
        assert not seen["busy"], "a process in a CPU loop was taken for blocked"
        assert not IdleWatch().blocked([], time.monotonic()), "no processes: nothing to wait for is not 'blocked'"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
