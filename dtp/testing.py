"""Run a function on N ranks with real process groups, reusing the worker processes.

A fresh spawn of gloo ranks costs ~6 s (torch import plus rendezvous); a `RankPool` pays it
once and then runs each case in well under a second.  On a machine without CUDA the workers fork
from multiprocessing's forkserver, which imported torch and dtp once, so a pool that restarts
after a failure, or a second pool, starts in a fraction of a second (spawn elsewhere: CUDA wants
a clean process).  Each worker has one thread, a default process group (gloo on CPU, NCCL when
every rank has its own GPU), and a per-case timeout.  When a rank raises, the failure carries
that rank's traceback; ranks left waiting in a collective are killed and the pool restarts on
its next use, so nothing hangs.

Ctrl-C is the parent's alone: workers ignore SIGINT (a terminal sends it to the whole process
group), the parent kills them at once when interrupted while it waits on them, and a worker
exits by itself within half a second of its parent's death, so no rank outlives its pool.
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import itertools
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

from dtp.idle_ranks import IdleWatch
from dtp.launch import exit_when_orphaned, pick_backend, run_under_torchrun
from dtp.rank_logs import RankLogs, redirect_stderr

__all__ = ["RankPool", "RankError", "run_on_ranks", "run_under_torchrun", "pick_backend", "preload_in_workers"]


class RankError(RuntimeError):
    """One or more ranks raised, timed out or died; the message holds each rank's story."""


# What the forkserver imports once, before forking any worker: dtp (so torch and DTensor) and dynamo, which DTensor's
# first sharding propagation imports (its fake tensors).  Read when the server starts, at this process's first pool.
FORKSERVER_PRELOAD = ["dtp.testing", "torch._dynamo"]


def preload_in_workers(*modules: str) -> None:
    """Have every worker this process starts fork with `modules` already imported (call before the first pool)."""
    FORKSERVER_PRELOAD.extend(m for m in modules if m not in FORKSERVER_PRELOAD)


def worker_context():
    """The multiprocessing context workers start from: the forkserver, preloaded, where the platform has one and
    there is no CUDA; else spawn (each worker imports torch itself: a process that forks must never have met CUDA,
    and an import may probe it)."""
    if torch.cuda.is_available() or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def _worker(rank, world_size, init_file, backend, pg_timeout_s, tasks, results, owner_pid, environ, stderr_path):
    redirect_stderr(stderr_path)  # the pool forwards it, and quotes its end if this rank dies
    faulthandler.enable(all_threads=True)  # a rank killed by a signal (a C++ crash) leaves its Python stacks there
    # Only the parent decides on Ctrl-C: a task must not turn it into an "err" reply and carry on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent while spawning
    exit_when_orphaned(owner_pid)  # the pool's owner, whose child this is under spawn, its forkserver's under fork
    os.environ.clear()  # the owner's environment now, not the forkserver's at its start
    os.environ.update(environ)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        results.put((None, rank, "ready", None))
    except BaseException:
        results.put((None, rank, "err", traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        case_id, fn, args, kwargs = task
        try:
            results.put((case_id, rank, "ok", fn(*args, **kwargs)))
        except BaseException:
            results.put((case_id, rank, "err", traceback.format_exc()))
    results.close()
    results.join_thread()
    os._exit(0)  # no process-group teardown handshakes: the pool is going away as a whole


@contextlib.contextmanager
def _sigint_blocked():
    """SIGINT blocked in this thread for the block (a pending one is delivered right after)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class RankPool:
    """`world_size` long-lived worker ranks; `run(fn, ...)` calls fn on all and returns their results by rank."""

    def __init__(self, world_size: int, *, backend: str | None = None, timeout: float = 120.0,
                 pg_timeout: float = 60.0):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        self.world_size = world_size
        self.backend = backend or pick_backend(world_size)
        self.timeout = timeout
        self.pg_timeout = pg_timeout
        self._ctx = worker_context()
        self._procs: list = []
        self._tasks: list = []
        self._ready = False
        self._stopping = False
        self._case_ids = itertools.count()

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> "RankPool":
        """Spawn the workers (non-blocking); `run` waits for them to be ready."""
        if self._procs:
            return self
        try:
            fd, self._init_file = tempfile.mkstemp(prefix="dtp_rdzv_")
            os.close(fd)
            os.unlink(self._init_file)
            self._logs = RankLogs(self._init_file, self.world_size)
            self._results = self._ctx.Queue()
            self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
            self._ready = self._stopping = False
            with _sigint_blocked():  # the workers inherit the mask: a Ctrl-C while they import torch spares them
                for rank in range(self.world_size):
                    p = self._ctx.Process(
                        target=_worker,
                        args=(rank, self.world_size, self._init_file, self.backend, self.pg_timeout,
                              self._tasks[rank], self._results, os.getpid(), dict(os.environ),
                              self._logs.paths[rank]),
                        daemon=True,
                    )
                    p.start()
                    self._procs.append(p)
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_ready(self) -> None:
        if self._ready:
            return
        replies = self._collect(None, self.timeout + 60.0)
        self._raise_if_failed(replies, "starting the ranks")
        self._ready = True

    def stop(self) -> None:
        """Ask idle workers to exit (without waiting); `close` then reaps them."""
        if self._procs and self._ready:
            for q in self._tasks:
                q.put(None)
            self._ready, self._stopping = False, True

    def close(self) -> None:
        """Stop the workers: politely if they are idle, at once if still starting, by force after a few seconds."""
        if not self._procs:
            return
        try:
            self.stop()
            if self._stopping:  # a pool never waited on (still starting) got no stop request: kill, don't wait
                deadline = time.monotonic() + 5
                for p in self._procs:
                    p.join(timeout=max(0.0, deadline - time.monotonic()))
        finally:  # also when a second Ctrl-C cuts the polite wait short
            self._kill()

    def kill(self) -> None:
        """Kill the workers now (SIGKILL) without waiting for them; the next `run` starts afresh."""
        self._kill()

    def _kill(self) -> None:
        procs, self._procs, self._ready, self._stopping = self._procs, [], False, False
        for p in procs:  # signal them all before reaping any, so an interrupt while reaping leaves none alive
            if p.is_alive():
                p.kill()
        for q in self._tasks:  # a task a killed rank never read must not make interpreter exit wait on its pipe
            q.cancel_join_thread()
        if getattr(self, "_logs", None):
            self._logs, logs = None, self._logs
            logs.remove()
        if getattr(self, "_init_file", None) and os.path.exists(self._init_file):
            os.unlink(self._init_file)
        deadline = time.monotonic() + 5  # one bound for the pool, not one per rank: a Ctrl-C exits within seconds
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "RankPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running ----------------------------------------------------------------------------
    def run(self, fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> list:
        """Call fn(*args, **kwargs) on every rank; return [result of rank 0, rank 1, ...].

        fn must be picklable (a module-level function or a functools.partial of one).  Raises
        RankError with the failing ranks' tracebacks if any rank raises, dies or times out.
        """
        self.start()
        try:
            self._wait_ready()
            case_id = next(self._case_ids)
            for q in self._tasks:
                q.put((case_id, fn, args, kwargs))
            replies = self._collect(case_id, timeout or self.timeout)
        except BaseException:  # Ctrl-C (or anything) while ranks may be mid-task: kill them, don't wait on them
            self._kill()
            raise
        self._raise_if_failed(replies, getattr(fn, "__name__", repr(fn)))
        self._logs.forward()
        return [replies[r][1] for r in range(self.world_size)]

    def _collect(self, case_id, timeout: float) -> dict:
        """Gather one reply per rank; after a failure give the others a short grace period (3 s, ended early once every
        missing rank looks blocked: asleep, using almost no CPU, for a second; dtp.idle_ranks)."""
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        grace_set, idle = False, IdleWatch()
        while len(replies) < self.world_size:
            if not grace_set and any(kind == "err" for kind, _ in replies.values()):
                deadline, grace_set = min(deadline, time.monotonic() + 3.0), True
            try:
                cid, rank, kind, payload = self._results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in replies]
                for r in dead:
                    replies[r] = ("err", f"rank {r} died (exit code {self._procs[r].exitcode}); the end of its "
                                         f"stderr:\n{self._logs.tail(r, 8000) or '(nothing)'}")
                now = time.monotonic()
                if now > deadline or (grace_set and idle.blocked(
                        [p.pid for r, p in enumerate(self._procs) if r not in replies], now)):
                    break
                continue
            if cid == case_id:
                replies[rank] = (kind, payload)
        return replies

    def _raise_if_failed(self, replies: dict, what: str) -> None:
        failed = {r: v for r, v in replies.items() if v[0] == "err"}
        missing = [r for r in range(self.world_size) if r not in replies]
        if not failed and not missing:
            return
        # Ranks may be stuck in a collective with a failed peer: start afresh next time.
        self._kill()
        parts = [f"{what} failed on {self.world_size} ranks ({self.backend})"]
        for r, (_, tb) in sorted(failed.items()):
            parts.append(f"--- rank {r} raised ---\n{tb}")
        if missing and failed:
            parts.append(f"--- ranks {missing} were stopped: they waited in a collective for rank(s) {sorted(failed)} ---")
        elif missing:
            parts.append(f"--- ranks {missing} gave no answer (timed out or stuck in a collective) ---")
        raise RankError("\n".join(parts))


def run_on_ranks(fn: Callable, world_size: int, *args: Any, backend: str | None = None,
                 timeout: float = 300.0, **kwargs: Any) -> list:
    """Spawn `world_size` ranks, run fn on each, return the results by rank, and stop them."""
    with RankPool(world_size, backend=backend, timeout=timeout) as pool:
        return pool.run(fn, *args, **kwargs)
