"""Launching ranks: the backend choice, one torchrun rank's bounded process group, and a script entry for both.

A script that calls `launch(train, ..., world_size=n)` starts n ranks itself (`dtp.testing.run_on_ranks`) when run
as `python script.py`, and is one rank when torchrun started it (RANK / WORLD_SIZE set): either way it gets rank 0's
result in exactly one process, so it prints each result once.  The backend is nccl when CUDA has a GPU for each
local rank, gloo otherwise; `backend=` (an example's `--backend`) or `$DTP_BACKEND` overrides it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import select
import sys
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["BACKEND_ENV", "pick_backend", "under_torchrun", "run_under_torchrun", "launch", "script_world_size",
           "add_launch_arguments", "rank_device"]

BACKEND_ENV = "DTP_BACKEND"
_PARENT_POLL_S = 0.5


def pick_backend(world_size: int | None = None, backend: str | None = None) -> str:
    """backend if given, else $DTP_BACKEND, else nccl when CUDA has a GPU for each of world_size local ranks, else gloo."""
    choice = backend or os.environ.get(BACKEND_ENV) or None
    if choice is not None:
        if choice == "nccl" and not torch.cuda.is_available():
            source = "backend='nccl'" if backend else f"${BACKEND_ENV}=nccl"
            raise ValueError(f"{source} needs CUDA, but torch.cuda.is_available() is False here; "
                             f"use 'gloo' (or leave the backend unset to pick it)")
        return choice
    if world_size is None:
        world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def under_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting RANK and WORLD_SIZE) started as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def exit_when_orphaned(parent_pid: int) -> None:
    """Start a daemon thread that ends this process as soon as process parent_pid is gone (even mid-collective).

    parent_pid need not be the OS parent (a forkserver's child watches the pool's owner): a pidfd where Linux has
    one (no pid-reuse race), else polling that it lives and that this process was not reparented."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux >= 5.3
        pidfd = None
    ppid = os.getppid()

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return os.getppid() == ppid

    def watch():
        if pidfd is not None:
            select.select([pidfd], [], [])  # readable once the process has exited
        else:
            while alive():
                time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="dtp-parent-watch", daemon=True).start()


def run_under_torchrun(fn: Callable, *args: Any, backend: str | None = None, timeout_s: float = 120.0,
                       **kwargs: Any):
    """This process is one torchrun rank: a process group whose collectives give up after timeout_s (not torch's
    30-minute default), fn(*args, **kwargs), and on any exception the traceback and an immediate exit, so that
    torchrun ends the other ranks at once instead of leaving them waiting in a collective."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    backend = pick_backend(local_world, backend)
    if "nccl" in backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent is the parent: a killed agent leaves no rank behind
        exit_when_orphaned(os.getppid())
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()
    return result


def script_world_size(requested: int | None, default: int = 2) -> int:
    """torchrun's WORLD_SIZE under torchrun (a different requested size is an error), else requested or default."""
    if not under_torchrun():
        return default if requested is None else requested
    world = int(os.environ["WORLD_SIZE"])
    if requested is not None and requested != world:
        if os.environ["RANK"] != "0":
            raise SystemExit(2)  # rank 0 says why, once
        raise SystemExit(f"--world-size {requested} contradicts torchrun's WORLD_SIZE={world}: under torchrun the "
                         f"ranks are torchrun's (--nnodes x --nproc_per_node); drop --world-size")
    return world


def add_launch_arguments(parser: argparse.ArgumentParser, default_world_size: int = 2) -> None:
    """Add --world-size (ranks to start; torchrun's under torchrun) and --backend to an example's parser."""
    parser.add_argument("--world-size", type=int, default=None,
                        help=f"ranks to start (default {default_world_size}); under torchrun, torchrun's WORLD_SIZE")
    parser.add_argument("--backend", default=None,
                        help=f"process-group backend (default: ${BACKEND_ENV}, else nccl with a GPU per local rank, "
                             f"else gloo)")


def launch(fn: Callable, *args: Any, world_size: int, backend: str | None = None, **kwargs: Any):
    """fn on every rank (torchrun's, or world_size spawned here); rank 0's result in one process, None elsewhere."""
    if under_torchrun():
        result = run_under_torchrun(fn, *args, backend=backend, **kwargs)
        return result if int(os.environ["RANK"]) == 0 else None
    from dtp.testing import run_on_ranks

    return run_on_ranks(fn, world_size, *args, backend=backend, **kwargs)[0]


def rank_device() -> torch.device:
    """The device this rank computes on: its current CUDA device under nccl, else the CPU."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
