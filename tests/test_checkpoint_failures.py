"""Saves and loads that fail do so with one dtp.CheckpointError (an Exception) on every rank, within seconds, naming the
path and the first failing rank's cause, and leave the previous checkpoint and the model as they were: an unwritable
directory (for every rank, or for one), a full disk (a file-size limit on one rank), a path that is a file or lies
under one, a corrupt data file, an unfinished plain DCP save, an unmarked dtp .partial."""

import contextlib
import os
import resource
import shutil
import signal
import tempfile
import time

import pytest
import torch
import torch.distributed as dist

import dtp

from .test_checkpoint import build, full_states
from tests.slowness import allowed


@contextlib.contextmanager
def _unprivileged(on=True):
    """As nobody where the tests run as root (root writes into a read-only directory): os.seteuid, undone after."""
    if not on or os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@contextlib.contextmanager
def _file_size_limit(nbytes, on=True):
    """A full disk for this rank: writes past nbytes fail (SIGXFSZ ignored, so the write errs instead of killing)."""
    if not on:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _fails(call, expected=dtp.CheckpointError):
    start = time.monotonic()
    with pytest.raises(expected) as info:
        call()
    assert isinstance(info.value, Exception)  # not a BaseException that `except Exception` misses
    return type(info.value).__name__, str(info.value), round(time.monotonic() - start, 2)


def _on_rank0(fn):
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


def case_failing_saves_and_loads(root):
    """Each failure: the same error on every rank, fast; the checkpoint saved before it still loads bit for bit."""
    rank, results = dist.get_rank(), {}
    good = f"{root}/good"
    model, opt = build("tp", seed=1)
    dtp.save_checkpoint(good, model, opt)
    saved = full_states(model, opt)
    other, other_opt = build("tp", seed=2)

    def still_good():
        probe, probe_opt = build("tp", seed=3)
        dtp.load_checkpoint(good, probe, probe_opt)
        assert all(torch.equal(v, saved[k]) for k, v in full_states(probe, probe_opt).items()), "the old one changed"

    _on_rank0(lambda: (os.makedirs(f"{root}/read_only"), os.chmod(f"{root}/read_only", 0o555),
                       open(f"{root}/a_file", "w").write("not a checkpoint"), os.makedirs(f"{root}/results"),
                       open(f"{root}/results/notes.txt", "w").write("mine")))
    with _unprivileged():  # every rank: rank 0 cannot even make the .partial directory
        results["unwritable"] = _fails(lambda: dtp.save_checkpoint(f"{root}/read_only/ckpt", other, other_opt))
    if os.geteuid() == 0:  # only rank 1 cannot write its shard into the .partial rank 0 made
        with _unprivileged(on=rank == 1):
            results["unwritable on rank 1"] = _fails(lambda: dtp.save_checkpoint(good, other, other_opt))
        still_good()
    with _file_size_limit(4096, on=rank == 1):  # rank 1's disk is full
        results["full disk on rank 1"] = _fails(lambda: dtp.save_checkpoint(good, other, other_opt))
    still_good()
    results["save to a file"] = _fails(lambda: dtp.save_checkpoint(f"{root}/a_file", other, other_opt))
    results["save under a file"] = _fails(lambda: dtp.save_checkpoint(f"{root}/a_file/ckpt", other, other_opt))
    results["save over a directory of other files"] = _fails(lambda: dtp.save_checkpoint(f"{root}/results", other))
    results["load a file"] = _fails(lambda: dtp.load_checkpoint(f"{root}/a_file", other, other_opt))
    assert open(f"{root}/a_file").read() == "not a checkpoint" and os.listdir(f"{root}/results") == ["notes.txt"]

    def damage():
        shutil.copytree(good, f"{root}/corrupt")
        with open(f"{root}/corrupt/__1_0.distcp", "r+b") as f:
            f.truncate(os.path.getsize(f"{root}/corrupt/__1_0.distcp") // 2)
        shutil.copytree(good, f"{root}/no_metadata")
        os.remove(f"{root}/no_metadata/.metadata")  # a plain dcp.save cut short: its data, no .metadata
        os.remove(f"{root}/no_metadata/dtp_complete.json")
        shutil.copytree(good, f"{root}/unmarked.partial")
        os.remove(f"{root}/unmarked.partial/dtp_complete.json")

    _on_rank0(damage)
    before = full_states(other, other_opt)
    results["load a corrupt file"] = _fails(lambda: dtp.load_checkpoint(f"{root}/corrupt", other, other_opt))
    results["load without .metadata"] = _fails(lambda: dtp.load_checkpoint(f"{root}/no_metadata", other),
                                               dtp.CheckpointMismatch)
    results["load an unmarked .partial"] = _fails(lambda: dtp.load_checkpoint(f"{root}/unmarked.partial", other),
                                                  dtp.CheckpointMismatch)
    assert all(torch.equal(v, before[k]) for k, v in full_states(other, other_opt).items()), "a failed load changed it"
    dtp.save_checkpoint(good, other, other_opt)  # and after it all, a save and a load that work
    dtp.load_checkpoint(good, model, opt)
    assert all(torch.equal(v, before[k]) for k, v in full_states(model, opt).items())
    return results


NEEDLES = {  # what each message names besides the path: the first failing rank and its cause
    "unwritable": ["on rank 0", "PermissionError", "read_only/ckpt"],
    "unwritable on rank 1": ["writing", "on rank 1", "PermissionError", "is as it was"],
    "full disk on rank 1": ["writing", "on rank 1", "file-size limit", "is as it was"],
    "save to a file": ["a_file is a file"],
    "save under a file": ["on rank 0", "NotADirectoryError", "a_file/ckpt"],
    "save over a directory of other files": ["results is a directory but no checkpoint", "notes.txt"],
    "load a file": ["a_file is a file"],
    "load a corrupt file": ["reading", "corrupt", "nothing was loaded"],
    "load without .metadata": ["no_metadata is incomplete", "no .metadata, which DCP writes last"],
    "load an unmarked .partial": ["unmarked.partial is incomplete", "without dtp_complete.json"],
}


def test_failing_saves_and_loads_raise_one_error_on_every_rank(pools):
    root = tempfile.mkdtemp(prefix="dtp_ckpt_")  # not under pytest's 0700 tmp: a rank as nobody must reach it
    os.chmod(root, 0o755)
    try:
        results = pools.run(2, case_failing_saves_and_loads, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert results[0].keys() == results[1].keys()
    for name, (kind, message, seconds) in results[0].items():
        assert (kind, message) == results[1][name][:2], f"{name}: ranks differ: {message!r} vs {results[1][name][1]!r}"
        assert root in message and all(n in message for n in NEEDLES[name]), f"{name}: {message}"
        assert max(seconds, results[1][name][2]) < allowed(10), f"{name}: {seconds} s"
    assert pools.run(2, dist.get_world_size) == [2, 2]  # the pool is still usable
