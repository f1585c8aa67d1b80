"""The launch path: the examples under torchrun (each result printed once), two torchrun "nodes" on localhost, the
backend choice, and no rank outliving a killed torchrun agent.  Every torchrun job here is a real gloo run."""

import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from dtp.launch import BACKEND_ENV, pick_backend, run_under_torchrun, script_world_size
from tests.slowness import allowed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_TIMEOUT_S = 240  # each job alone takes ~8 s on a quiet 2-core machine; all of them start at once
TWO = ["--standalone", "--nproc_per_node", "2"]
GLOO = {BACKEND_ENV: "gloo"}  # two "nodes" on one machine would share its GPUs: nccl refuses two ranks on one GPU

# name: (torchrun arguments, extra environment, number of "step" lines, the summary line it prints once)
EXAMPLES = {
    "train_mlp": (TWO + ["examples/train_mlp.py", "--steps", "3", "--backend", "gloo"], {}, 3,
                  r"^max \|tp loss - single-process loss\| over 3 steps on 2 ranks \(gloo\)"),
    "train_gpt_sp": (TWO + ["examples/train_gpt.py", "--steps", "3", "--sequence-parallel"], GLOO, 3,
                     r"^loss .* over 3 steps on 2 ranks \(gloo\)"),
    "nanogpt": (TWO + ["examples/nanogpt.py", "--steps", "2"], {}, 2, r"^gpt: max \|tp - one process\| .* on 2 ranks"),
    "checkpoint_reshard": (TWO + ["examples/checkpoint_reshard.py", "--save-at", "2", "--steps", "4"], {}, 4,
                           r"^trained dp=2 x tp=1 on 2 ranks, .* reloaded as tp=2 on the same 2 torchrun ranks$"),
}


def free_port() -> int:
    """A TCP port nobody listens on now, below the kernel's ephemeral range where the machine has room for one.

    A port from bind(0) is released before torchrun binds it, seconds later; meanwhile a gloo rank of a pool or of
    another job may take it with a bind(0) of its own, and a store client that then connects there feeds gloo bytes
    it aborts on (SIGABRT).  bind(0) never hands out a port below the ephemeral range, so one from there is ours."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = random.sample(range(max(1024, low - 12000), low), min(64, max(0, low - 1024))) if low > 1024 else []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: a port from it, and the retry on "address already in use"
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list:
    """Every live process below pid (torchrun's ranks run in sessions of their own, so killpg misses them)."""
    children: dict = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Job:
    """A torchrun command started now in its own session; wait() bounds it and kills it and its ranks on timeout."""

    def __init__(self, args: list, env: dict | None = None):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def wait(self, timeout: float | None = None) -> tuple:
        """(return code, stdout, stderr); on timeout the job is killed and the test fails with its stderr."""
        timeout = timeout or allowed(JOB_TIMEOUT_S)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            pytest.fail(f"torchrun {' '.join(self.args)} ran over {timeout} s; killed\n{err[-3000:]}")
        return self.proc.returncode, out, err

    def kill(self) -> None:
        """SIGKILL torchrun and every rank it started."""
        if self.proc.poll() is None:
            for pid in [self.proc.pid, *descendants(self.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def two_node_args(kind: str, port: int, node: int) -> list:
    """torchrun's arguments for node `node` of 2 on localhost: c10d rendezvous (2 ranks each) or master_addr/port."""
    if kind == "c10d":
        return ["--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "dtp-two-nodes",
                "--rdzv_conf", f"join_timeout={int(allowed(120))}", "tests/torchrun_nodes.py", "mesh"]
    return ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "localhost",
            "--master_port", str(port), "tests/torchrun_nodes.py", "mesh"]


_STARTED: dict = {}  # name -> Job (or [Job, Job] for two nodes), once started


def start_jobs() -> dict:
    """Every torchrun job of this module, started together (they overlap on the cores).  The conftest calls this as
    the session begins when this module is selected, so the jobs also overlap with the tests before it."""
    if not _STARTED:
        _STARTED.update({name: Job(args, env) for name, (args, env, _, _) in EXAMPLES.items()})
        for kind in ("c10d", "master_addr"):
            port = free_port()
            _STARTED[kind] = [Job(two_node_args(kind, port, node), GLOO) for node in (0, 1)]
        _STARTED["hang"] = Job(["--standalone", "--nproc_per_node", "1", "tests/torchrun_nodes.py", "hang"])
    return _STARTED


def kill_jobs() -> None:
    """Kill every job start_jobs started, with its ranks."""
    for job in _STARTED.values():
        for j in job if isinstance(job, list) else [job]:
            j.kill()


@pytest.fixture(scope="module")
def jobs():
    yield start_jobs()
    kill_jobs()


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_under_torchrun_prints_each_result_once(jobs, name):
    _, _, steps, summary = EXAMPLES[name]
    code, out, err = jobs[name].wait()
    assert code == 0, f"{name} failed under torchrun\n{out}\n{err[-3000:]}"
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), f"a line printed more than once:\n{out}"
    step_lines = [line for line in lines if line.startswith("step")]
    assert len(step_lines) == steps, out
    assert sum(bool(re.search(summary, line)) for line in lines) == 1, out
    diffs = [float(d) for d in re.findall(r"\|diff\| ([0-9.e+-]+)", out)]
    assert diffs and max(diffs) < 1e-4, out


@pytest.mark.parametrize("kind", ["c10d", "master_addr"])
def test_two_torchrun_nodes_on_localhost(jobs, kind):
    """Two torchrun "nodes" (c10d: 2 ranks each, master_addr/port: 1 each) form one job on a (dp, tp) mesh."""
    node0, node1 = jobs[kind]
    (code0, out0, err0), (code1, out1, err1) = node0.wait(), node1.wait()
    if "address already in use" in (err0 + err1).lower():  # the free port was taken between our probe and torchrun
        port = free_port()
        node0, node1 = Job(two_node_args(kind, port, 0), GLOO), Job(two_node_args(kind, port, 1), GLOO)
        (code0, out0, err0), (code1, out1, err1) = node0.wait(), node1.wait()
    assert code0 == 0 and code1 == 0, f"{kind}: node 0 rc {code0}, node 1 rc {code1}\n{err0[-2000:]}\n{err1[-2000:]}"
    lines = [line for line in (out0 + out1).splitlines() if line.startswith("mesh")]
    tp = 2 if kind == "c10d" else 1
    groups = "[[0, 1], [2, 3]] on nodes [[0, 0], [1, 1]]" if tp == 2 else "[[0], [1]] on nodes [[0], [1]]"
    assert len(lines) == 1 and f"mesh (dp=2, tp={tp}) on gloo: tp groups {groups}" in lines[0], out0 + out1
    assert float(lines[0].rsplit(" ", 1)[1]) < 1e-5, lines[0]


def test_no_rank_outlives_a_killed_torchrun_agent(jobs):
    """SIGKILL to torchrun (OOM killer, a CI timeout): run_under_torchrun's ranks see it and exit within seconds."""
    job, pids, line = jobs["hang"], [], "-"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not pids and line and select.select([job.proc.stdout], [], [], max(0, deadline - time.monotonic()))[0]:
        line = job.proc.stdout.readline()  # the rank prints its pid (a whole line), then sleeps for an hour
        pids += [int(p) for p in re.findall(r"pid (\d+)", line)]
    if not pids:
        job.kill()
        pytest.fail(f"the rank did not start within {JOB_TIMEOUT_S} s:\n{job.proc.stderr.read()[-2000:]}")
    try:
        os.kill(job.proc.pid, signal.SIGKILL)  # the agent only: it cannot pass anything on to its ranks
        job.proc.wait(timeout=allowed(30))
        start = time.monotonic()
        while any(alive(p) for p in pids) and time.monotonic() - start < 30:
            time.sleep(0.1)
        elapsed = time.monotonic() - start
        assert not any(alive(p) for p in pids), "ranks still running 30 s after their torchrun agent was killed"
        assert elapsed < allowed(10), f"the ranks took {elapsed:.1f} s to notice their agent had gone"
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_backend_choice_and_overrides(monkeypatch):
    """nccl with a GPU per local rank, else gloo; backend= beats $DTP_BACKEND, which beats the choice."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    fake_gpus(monkeypatch, 0)
    assert pick_backend(2) == "gloo"
    with pytest.raises(ValueError, match=r"backend='nccl' needs CUDA.*torch.cuda.is_available\(\) is False"):
        pick_backend(2, "nccl")
    monkeypatch.setenv(BACKEND_ENV, "nccl")
    with pytest.raises(ValueError, match=r"\$DTP_BACKEND=nccl needs CUDA"):
        pick_backend(2)
    fake_gpus(monkeypatch, 2)
    monkeypatch.delenv(BACKEND_ENV)
    assert pick_backend(2) == "nccl" and pick_backend(4) == "gloo"  # 4 ranks, 2 GPUs: not one each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")  # 4 nodes of 2: each node's 2 ranks have a GPU each
    assert pick_backend() == "nccl"
    monkeypatch.setenv(BACKEND_ENV, "gloo")
    assert pick_backend(2) == "gloo" and pick_backend(2, "nccl") == "nccl"
    from dtp.testing import RankPool, pick_backend as testing_pick_backend

    assert testing_pick_backend is pick_backend and RankPool(2).backend == "gloo"  # never started: no process


def test_run_under_torchrun_takes_the_override(monkeypatch):
    """A one-rank job in this process, GPUs faked: $DTP_BACKEND=gloo and backend="gloo" both keep it off nccl."""
    fake_gpus(monkeypatch, 8)
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for env, arg in (("gloo", None), ("nccl", "gloo")):
        monkeypatch.setenv(BACKEND_ENV, env)
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        assert run_under_torchrun(lambda: str(dist.get_backend()), backend=arg) == "gloo"
        assert not dist.is_initialized()


def test_script_world_size(monkeypatch):
    """--world-size starts that many ranks; under torchrun the ranks are torchrun's and a different size is an error."""
    monkeypatch.delenv("RANK", raising=False)
    assert script_world_size(None, default=4) == 4 and script_world_size(3) == 3
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert script_world_size(None, default=4) == 2 and script_world_size(2) == 2
    with pytest.raises(SystemExit, match="--world-size 4 contradicts torchrun's WORLD_SIZE=2"):
        script_world_size(4)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as info:
        script_world_size(4)
    assert info.value.code == 2  # only rank 0 says why
