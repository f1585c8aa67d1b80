"""Sharded checkpoints with torch's distributed checkpoint (DCP): saved at one layout, loaded at any other.

Crash-safe: a save writes `path.partial`, marks it complete, retires `path` to `path.old` and promotes
`path.partial` to `path`.  A crash at any step (an exception, or a rank killed) leaves the newest
complete copy — `path`, or between the two renames `path.partial` (new) / `path.old` (previous) —
which `load_checkpoint(path)` finds and the next `save_checkpoint(path)` puts back at `path` first.

Strict: everything is checked on every rank before anything loads, and a mismatch is a
`CheckpointMismatch` (an ordinary ValueError) naming the first differing keys: model keys the
checkpoint lacks, checkpoint keys the model lacks (allowed and reported with strict=False), an
optimizer whose state the checkpoint does not hold or holds for another optimizer.

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

from dtp.checkpoint.full import packed_layouts
from dtp.checkpoint.packed_state import to_original_layout, to_packed_layout

__all__ = ["save_checkpoint", "load_checkpoint", "resolve_checkpoint", "CheckpointMismatch", "CheckpointError"]

MARKER = "dtp_complete.json"


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model or optimizer; raised on every rank before anything is loaded."""


class CheckpointError(RuntimeError):
    """DCP failed on some rank (its CheckpointException is a BaseException); the root cause comes first."""


def _at(step: str) -> None:
    """A seam for tests: called before each step that finishes a save (a crash there must lose nothing)."""


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _complete(directory: str) -> bool:
    return os.path.isdir(directory) and os.path.exists(os.path.join(directory, MARKER))


def resolve_checkpoint(path: str) -> str | None:
    """The directory holding path's newest complete checkpoint: path, or after a save cut between its renames
    path.partial (the new one, complete) or path.old (the previous one); None if there is none."""
    for candidate in (path, path + ".partial", path + ".old"):
        if _complete(candidate):
            return candidate
    return None


def _recover(path: str) -> None:
    """Rank 0, before a save: the newest complete copy back at path; the debris of interrupted saves removed."""
    newest = resolve_checkpoint(path)
    if newest is not None and newest != path:
        if os.path.exists(path):
            shutil.rmtree(path)  # never complete here: only complete directories are renamed to path
        os.replace(newest, path)
    for debris in (path + ".partial", path + ".old"):
        if os.path.exists(debris):
            shutil.rmtree(debris)


def save_checkpoint(path: str, model: nn.Module, optimizer=None) -> None:
    """Sharded save with DCP (each rank writes its shards), crash-safe: path always holds (or recovers) the new or the
    previous checkpoint.  A failure while finishing, on rank 0, is raised on every rank (none waits for it)."""
    dcp, get_state_dict, _ = _dcp()
    path = os.path.abspath(path)
    if _is_rank0():
        _recover(path)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    # packed projections are saved in their original layout (dtp.checkpoint.packed_state)
    state, _ = to_original_layout({"model": model_sd, "optim": optim_sd}, packed_layouts(model))
    dcp.save(state, checkpoint_id=path + ".partial")  # ends with DCP's barrier
    failure = ""
    if _is_rank0():
        try:
            _finalize(path + ".partial", path)
        except Exception as exc:  # every rank learns of it below
            failure = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized():
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure:
        raise RuntimeError(f"save_checkpoint: finishing {path} failed on rank 0 ({failure}); "
                           f"load_checkpoint({path!r}) finds the newest complete checkpoint")


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


def _flat_keys(state: dict) -> set:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return set(flatten_state_dict(state)[0])


def _first(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _check_loadable(path: str, found: str | None, model_sd: dict, optim_sd: dict, optimizer, strict: bool) -> list:
    """Every rank checks the directory, the keys and the shapes before anything is loaded; returns the skipped keys."""
    from torch.distributed.checkpoint import FileSystemReader

    if found is None:
        if os.path.isdir(path):
            raise CheckpointMismatch(f"load_checkpoint: {path} is incomplete (no {MARKER}: the save that wrote it "
                                     f"did not finish)")
        raise FileNotFoundError(f"load_checkpoint: no checkpoint directory at {path}")
    saved = FileSystemReader(found).read_metadata().state_dict_metadata
    mine = _flat_keys({"model": model_sd})
    theirs = {k for k in saved if k.startswith("model.")}
    problems = [f"{k[6:]}: not in the checkpoint" for k in sorted(mine - theirs)[:4]]
    for name, value in model_sd.items():
        meta = saved.get(f"model.{name}")
        if isinstance(value, torch.Tensor) and meta is not None and hasattr(meta, "size") \
                and tuple(meta.size) != tuple(value.shape):
            problems.append(f"{name}: checkpoint {tuple(meta.size)} vs model {tuple(value.shape)}")
    extra = sorted(theirs - mine)
    if extra and strict:
        problems.append(f"in the checkpoint but not in the model (strict=False skips them): {_first(extra)}")
    if optimizer is not None:
        want = {k for k in _flat_keys({"optim": optim_sd}) if k.startswith("optim.state.")}
        skipped = {k[6:] for k in extra}  # the optimizer state of parameters the model lacks goes with them
        have = {k for k in saved if k.startswith("optim.state.") and k[12:].rsplit(".", 1)[0] not in skipped}
        if not have:
            problems.append("the checkpoint holds no optimizer state (it was saved without an optimizer); "
                            "load it without one")
        elif want != have:
            problems.append(f"the optimizer state differs (another optimizer?): the optimizer wants "
                            f"{_first(want - have)}, the checkpoint holds {_first(have - want)}")
    if problems:
        raise CheckpointMismatch(f"load_checkpoint: {found} does not fit; nothing was loaded: " + "; ".join(problems))
    return [k[6:] for k in extra]


def load_checkpoint(path: str, model: nn.Module, optimizer=None, *, strict: bool = True) -> list:
    """Load a save_checkpoint directory into a model (and optimizer) of any layout: DCP reshards every tensor.
    Checked first on every rank; loaded into copies, applied only when all read.  Returns the checkpoint's model keys
    the model lacks, which strict=False skips (strict=True refuses them, as load_state_dict does)."""
    dcp, get_state_dict, set_state_dict = _dcp()
    path = os.path.abspath(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    found = resolve_checkpoint(path)
    skipped = _check_loadable(path, found, model_sd, optim_sd, optimizer, strict)
    state = {"model": _detached_copy(model_sd), "optim": _detached_copy(optim_sd)}
    state, replaced = to_original_layout(state, packed_layouts(model), empty=True)  # read packed projections as saved
    try:
        dcp.load(state, checkpoint_id=found)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException: hand on an ordinary one
        if type(exc).__name__ != "CheckpointException":
            raise
        causes = [f"rank {r}: {type(e).__name__}: {e}" for r, e in getattr(exc, "failures", {}).items()]
        raise CheckpointError(f"load_checkpoint: DCP failed reading {found}: " + " | ".join(causes)) from exc
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
