"""Sharded checkpoints with torch's distributed checkpoint (DCP): saved at one layout, loaded at any other.

Crash-safe: a save writes `path.partial`, marks it complete, retires `path` to `path.old` and promotes
`path.partial` to `path`.  A crash at any step (an exception, or a rank killed) leaves the newest
complete copy — `path`, or between the two renames `path.partial` (new) / `path.old` (previous) —
which `load_checkpoint(path)` finds and the next `save_checkpoint(path)` puts back at `path` first.

Any complete DCP checkpoint loads: dtp's, or one written by a finished `dcp.save` (torch TP's or torchtitan's key
layout, dtp.checkpoint.interop); DCP writes `.metadata` last, so a directory without it, or a dtp `.partial` without
the marker, is an unfinished save, and the message says which.

Strict: everything is checked on every rank before anything loads, and a mismatch is a
`CheckpointMismatch` (an ordinary ValueError) naming the first differing keys: model keys the
checkpoint lacks, checkpoint keys the model lacks (allowed and reported with strict=False), an
optimizer whose state the checkpoint does not hold or holds for another optimizer.

Every failure of a save or load is a `CheckpointError` (an Exception; CheckpointMismatch and CheckpointNotFound are
kinds of it) raised on every rank alike, naming the path and the first failing rank's cause (dtp.checkpoint.errors).

Packed projections (dtp.ops.packed) are saved in their original layout and loaded into any packed layout
(dtp.checkpoint.packed_state): a checkpoint saved at tp 2 loads at tp 4, at tp 1 or into a model never parallelized.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn

from dtp.checkpoint.errors import CheckpointError, CheckpointMismatch, CheckpointNotFound, agreed, storage_note
from dtp.checkpoint.full import packed_layouts
from dtp.checkpoint.interop import check_keys, dcp_tree, first
from dtp.checkpoint.packed_state import to_original_layout, to_packed_layout

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "CheckpointMismatch", "CheckpointError",
           "CheckpointNotFound"]

MARKER = "dtp_complete.json"
METADATA = ".metadata"  # DCP's: written (to a .tmp, then renamed) after every rank's data, so it marks a finished save


def _at(step: str) -> None:
    """A seam for tests: called before each step that finishes a save (a crash there must lose nothing)."""


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def _complete(directory: str) -> bool:
    """DCP's .metadata (written last), and dtp's marker too in a dtp .partial (complete only once marked)."""
    if not os.path.isfile(os.path.join(directory, METADATA)):
        return False
    return not directory.endswith(".partial") or os.path.exists(os.path.join(directory, MARKER))


def resolve_checkpoint(path: str) -> str | None:
    """The directory holding path's newest complete checkpoint: path, or after a save cut between its renames
    path.partial (the new one, complete) or path.old (the previous one); None if there is none."""
    for candidate in (path, path + ".partial", path + ".old"):
        if _complete(candidate):
            return candidate
    return None


def _dcp_file(name: str) -> bool:
    return name == MARKER or name.startswith(METADATA) or name.endswith(".distcp") or name.startswith("__")


def _prepare(path: str) -> None:
    """Rank 0, before a save: refuse a file or a directory that is no checkpoint; put the newest complete copy back
    at path; remove the debris of interrupted saves; make path.partial."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(f"save_checkpoint: {path} is a file, not a checkpoint directory; nothing was written")
    if os.path.isdir(path) and not _complete(path):
        stray = [n for n in os.listdir(path) if not _dcp_file(n)]
        if stray:
            raise CheckpointError(f"save_checkpoint: {path} is a directory but no checkpoint (it holds "
                                  f"{first(stray)}); a save replaces only checkpoints: nothing was written")
    newest = resolve_checkpoint(path)
    if newest is not None and newest != path:
        if os.path.exists(path):
            shutil.rmtree(path)  # never complete here: only complete directories are renamed to path
        os.replace(newest, path)
    for debris in (path + ".partial", path + ".old"):
        if os.path.exists(debris):
            shutil.rmtree(debris)
    os.makedirs(path + ".partial")


def save_checkpoint(path: str, model: nn.Module, optimizer=None) -> None:
    """Sharded save with DCP (each rank writes its shards), crash-safe: path always holds (or recovers) the new or the
    previous checkpoint.  Any failure is the same CheckpointError on every rank, naming path and the first cause."""
    dcp, get_state_dict, _ = _dcp()
    path = os.path.abspath(path)
    agreed(f"save_checkpoint: preparing {path}", lambda: _prepare(path), only_rank=0, note=lambda: storage_note(path))
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    # packed projections are saved in their original layout (dtp.checkpoint.packed_state)
    state, _ = to_original_layout({"model": model_sd, "optim": optim_sd}, packed_layouts(model))
    agreed(f"save_checkpoint: writing {path} (to {os.path.basename(path)}.partial)",
           lambda: dcp.save(state, checkpoint_id=path + ".partial"), together=True,
           note=lambda: storage_note(path), hint=f"; {path} is as it was")
    agreed(f"save_checkpoint: finishing {path}", lambda: _finalize(path + ".partial", path), only_rank=0,
           hint=f"; load_checkpoint({path!r}) finds the newest complete checkpoint")


def _finalize(partial: str, path: str) -> None:
    _at("mark complete")
    with open(os.path.join(partial, MARKER), "w") as f:
        json.dump({"format": 1, "world_size": dist.get_world_size() if dist.is_initialized() else 1}, f)
    old = path + ".old"
    if os.path.exists(path):
        _at("retire previous")
        os.replace(path, old)
    _at("promote new")
    os.replace(partial, path)
    if os.path.exists(old):
        _at("remove previous")
        shutil.rmtree(old)


def _not_loadable(path: str) -> CheckpointError:
    """Why path holds no complete checkpoint, and how that was seen."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return CheckpointError(f"load_checkpoint: {path} is a file, not a checkpoint directory")
    if not os.path.isdir(path):
        partial = path + ".partial"
        beside = f" ({partial} is an unfinished save: it has no {MARKER})" if os.path.isdir(partial) else ""
        return CheckpointNotFound(f"load_checkpoint: no checkpoint directory at {path}{beside}")
    names = os.listdir(path)
    if path.endswith(".partial") and METADATA in names:
        why = f"a dtp save's .partial directory without {MARKER}: the save that wrote it did not finish"
    elif any(_dcp_file(n) for n in names):
        why = f"DCP data files ({first(names)}) but no {METADATA}, which DCP writes last: the save did not finish"
    elif not names:
        why = f"an empty directory (no {METADATA})"
    else:
        return CheckpointMismatch(f"load_checkpoint: {path} is not a DCP checkpoint: no {METADATA} "
                                  f"(it holds {first(names)})")
    return CheckpointMismatch(f"load_checkpoint: {path} is incomplete: {why}")


def _plan_load(path: str, model_sd: dict, optim_sd: dict, optimizer, strict: bool):
    """Every rank: the checkpoint directory, its metadata, its key layout, the keys and shapes checked."""
    from torch.distributed.checkpoint import FileSystemReader

    found = resolve_checkpoint(path)
    if found is None:
        raise _not_loadable(path)
    try:
        saved = FileSystemReader(found).read_metadata().state_dict_metadata
    except Exception as exc:
        raise CheckpointError(f"load_checkpoint: cannot read {os.path.join(found, METADATA)} "
                              f"({type(exc).__name__}: {exc})") from exc
    layout, skipped, problems = check_keys(saved, model_sd, optim_sd, optimizer is not None, strict)
    if problems:
        raise CheckpointMismatch(f"load_checkpoint: {found} does not fit; nothing was loaded: " + "; ".join(problems))
    return found, saved, layout, skipped


def load_checkpoint(path: str, model: nn.Module, optimizer=None, *, strict: bool = True) -> list:
    """Load a complete DCP checkpoint (dtp's, torch TP's, torchtitan's) into a model (and optimizer) of any layout:
    DCP reshards every tensor.  Checked first on every rank; loaded into copies, applied only when all read.  Returns
    the checkpoint's model keys the model lacks, which strict=False skips (strict=True refuses them)."""
    dcp, get_state_dict, set_state_dict = _dcp()
    path = os.path.abspath(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    found, saved, layout, skipped = agreed(f"load_checkpoint: reading {path}",
                                           lambda: _plan_load(path, model_sd, optim_sd, optimizer, strict))
    state = {"model": _detached_copy(model_sd), "optim": _detached_copy(optim_sd)}
    state, replaced = to_original_layout(state, packed_layouts(model), empty=True)  # read packed projections as saved
    tree, finish = dcp_tree(layout, state, saved)
    agreed(f"load_checkpoint: reading {found}", lambda: dcp.load(tree, checkpoint_id=found), together=True,
           hint="; nothing was loaded")
    finish()
    to_packed_layout(state, replaced)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    return skipped


def _detached_copy(tree):
    if isinstance(tree, dict):
        return {k: _detached_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_detached_copy(v) for v in tree]
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree
