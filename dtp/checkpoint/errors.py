"""Checkpoint failures that every rank raises alike: one exception type, the path, the first failing rank's cause.

A step of a save or load runs under `agreed`: whatever it raises on any rank (an OSError, DCP's CheckpointException,
which is a BaseException and gathers every rank's failure) becomes the same `CheckpointError` on every rank, after
one all-gather of what went wrong, so no rank is left waiting in a later collective.
"""

from __future__ import annotations

import errno
import os
import shutil

import torch.distributed as dist

__all__ = ["CheckpointError", "CheckpointMismatch", "CheckpointNotFound", "agreed", "storage_note"]


class CheckpointError(RuntimeError):
    """A save or load failed: raised on every rank alike, naming the path and the first failing rank's cause."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The checkpoint does not fit the model or optimizer, or is incomplete; raised on every rank, nothing loaded."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No checkpoint directory at the path, and no complete copy beside it."""


_OWN = {cls.__name__: cls for cls in (CheckpointError, CheckpointMismatch, CheckpointNotFound)}


def _is_dcp_failure(exc: BaseException) -> bool:
    from torch.distributed.checkpoint.api import CheckpointException

    return isinstance(exc, CheckpointException)


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _about_space(exc: BaseException) -> bool:
    """A failure that free space or a file-size limit may explain (not a permission or a path error)."""
    return not isinstance(exc, (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)) \
        and getattr(exc, "errno", None) != errno.EROFS


def _report(exc: BaseException, rank: int, note) -> tuple:
    """(reporting rank, class name, {failing rank: cause}, this rank's note, whether the cause is dtp's own message)."""
    if _is_dcp_failure(exc):  # DCP gathered every rank's failure: {rank: (exception, traceback)}
        inner = {r: f[0] if isinstance(f, tuple) else f for r, f in exc.failures.items()}
        mine = note() if note is not None and rank in inner and _about_space(inner[rank]) else ""
        return rank, "CheckpointError", {r: _cause(e) for r, e in inner.items()}, mine, False
    if isinstance(exc, CheckpointError) and type(exc).__name__ in _OWN:  # dtp's own, worded in full where found
        return rank, type(exc).__name__, {rank: str(exc)}, "", True
    return rank, "CheckpointError", {rank: _cause(exc)}, note() if note is not None and _about_space(exc) else "", False


def _gather(report) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [report]
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    return reports


def _error(what: str, reports: list, hint: str, world: int) -> CheckpointError:
    causes, notes, kinds = {}, {}, {}
    for rank, name, theirs, note, own in reports:
        for r, cause in theirs.items():
            causes.setdefault(r, cause)
            kinds.setdefault(r, (name, own))
        if note:
            notes[rank] = note
    first = min(causes)
    others = sorted(set(causes) - {first})
    name, own = kinds[first]
    if own:
        message = causes[first]
        if len(causes) < world:
            message += f" (found on rank{'s' if others else ''} {', '.join(map(str, sorted(causes)))} only)"
    else:
        message = f"{what} failed on rank {first}: {causes[first]}{notes.get(first, '')}"
        if others:
            message += f"; also on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"
    return _OWN[name](message + hint)


def agreed(what: str, fn, *, only_rank: int | None = None, together: bool = False, note=None, hint: str = ""):
    """Run fn on every rank (or on only_rank): a failure on any rank is raised on every rank as one CheckpointError."""
    # The message: `what` failed on rank r (the first failing one): its cause, note() from that rank, then hint.
    # together=True: fn fails on every rank or on none (dcp.save / dcp.load gather their failures themselves), so
    # ranks talk only after such a failure (for the failing rank's note); else one all-gather of the outcome.
    rank = dist.get_rank() if dist.is_initialized() else 0
    result, report, local = None, None, None
    if only_rank is None or rank == only_rank:
        try:
            result = fn()
        except BaseException as exc:
            if not isinstance(exc, Exception) and not _is_dcp_failure(exc):
                raise  # KeyboardInterrupt, SystemExit: not a checkpoint failure
            local, report = exc, _report(exc, rank, note)
    if together and (report is None or not _is_dcp_failure(local)):
        if report is None:
            return result
        raise _error(what, [report], hint, 1) from local  # raised outside DCP's collectives: none to agree with
    reports = [r for r in _gather(report) if r is not None]
    if not reports:
        return result
    world = dist.get_world_size() if dist.is_initialized() and only_rank is None else 1  # who was asked
    raise _error(what, reports, hint, world) from local


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def storage_note(path: str) -> str:
    """This rank's free space and file-size limit where path is written, for a failed save's message."""
    parts, probe = [], path
    while probe and not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        parts.append(f"{_size(shutil.disk_usage(probe).free)} free on its filesystem")
    except OSError:
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            parts.append(f"file-size limit (RLIMIT_FSIZE, ulimit -f) {_size(soft)}")
    except (ImportError, OSError, ValueError):
        pass
    return f" [{'; '.join(parts)}]" if parts else ""
