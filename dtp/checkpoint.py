"""Checkpoints of parallelized models: full (unsharded) state dicts gathered without hanging and loaded back as
slices, and sharded DCP checkpoints that load at any other layout (world size, 1-D or 2-D)."""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ["full_state_dict", "load_full_state_dict", "save_checkpoint", "load_checkpoint", "plain_name", "unwrap"]

_WRAPPER_SEGMENTS = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def plain_name(name: str) -> str:
    """A parameter name without torch.compile / FSDP1 / checkpoint-wrapper segments."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel wrapper (which prefixes every name with "module.")."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def full_state_dict(model: nn.Module, *, rank0_only: bool = False, cpu_offload: bool = False) -> dict:
    """{plain name: full plain tensor}; every rank gathers every DTensor in the same order (all-gathers), so none waits forever.

    rank0_only: other ranks take part in the gathers but return {}.  cpu_offload: tensors are moved to CPU.
    """
    out = {}
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    for name, value in unwrap(model).state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if keep:
            value = value.detach()
            out[plain_name(name)] = value.cpu() if cpu_offload else value.clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict, *, strict: bool = True) -> None:
    """Copy a full state dict into a (parallelized) model: each rank keeps its slice of each tensor (no collective).

    Everything is checked first (names, global shapes) on every rank, so a mismatch loads nothing.
    """
    targets = {plain_name(n): t for n, t in unwrap(model).state_dict(keep_vars=True).items()}
    missing = sorted(set(targets) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(targets))
    wrong = [f"{n}: checkpoint {tuple(state_dict[n].shape)} vs model {tuple(t.shape)}"
             for n, t in targets.items() if n in state_dict and tuple(state_dict[n].shape) != tuple(t.shape)]
    if wrong or (strict and (missing or unexpected)):
        lines = []
        if wrong:
            lines.append("shapes that do not fit: " + "; ".join(wrong))
        if strict and missing:
            lines.append(f"missing from the state dict: {missing}")
        if strict and unexpected:
            lines.append(f"not in the model: {unexpected}")
        raise ValueError("load_full_state_dict: nothing was loaded; " + " | ".join(lines))
    for name, target in targets.items():
        if name not in state_dict:
            continue
        full = state_dict[name]
        if isinstance(target, DTensor):
            local = distribute_tensor(full.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(full)


# -- sharded checkpoints with torch's distributed checkpoint (DCP) ----------------------------------

_MARKER = "dtp_complete.json"


def _dcp():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    return dcp, get_state_dict, set_state_dict


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_checkpoint(path: str, model: nn.Module, optimizer=None) -> None:
    """Sharded save with DCP (each rank writes its shards); written to `path.partial`, then renamed to `path` by rank 0
    once every rank finished, so an interrupted save never leaves a directory that loads as complete."""
    dcp, get_state_dict, _ = _dcp()
    path = os.path.abspath(path)
    partial = path + ".partial"
    if _is_rank0() and os.path.exists(partial):
        shutil.rmtree(partial)  # the debris of an earlier interrupted save
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=partial)  # ends with DCP's own barrier
    failure = ""
    if _is_rank0():
        try:
            _finalize(partial, path)
        except Exception as exc:  # every rank learns of it below, so none waits for a rank that gave up
            failure = f"{type(exc).__name__}: {exc}"
    if dist.is_initialized():
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure:
        raise RuntimeError(f"save_checkpoint: finishing {path} failed on rank 0 ({failure}); "
                           f"the previous checkpoint at {path}, if any, is unchanged")


def _finalize(partial: str, path: str) -> None:
    with open(os.path.join(partial, _MARKER), "w") as f:
        json.dump({"format": 1, "world_size": dist.get_world_size() if dist.is_initialized() else 1}, f)
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def _check_loadable(path: str, model_sd: dict) -> None:
    """Every rank checks the directory and the saved shapes before anything is loaded."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint directory at {path}")
    if not os.path.exists(os.path.join(path, _MARKER)):
        raise ValueError(f"load_checkpoint: {path} is incomplete (no {_MARKER}: the save that wrote it did not finish)")
    saved = FileSystemReader(path).read_metadata().state_dict_metadata
    problems = []
    for name, value in model_sd.items():
        meta = saved.get(f"model.{name}")
        if meta is None:
            problems.append(f"{name}: not in the checkpoint")
        elif isinstance(value, torch.Tensor) and hasattr(meta, "size") and tuple(meta.size) != tuple(value.shape):
            problems.append(f"{name}: checkpoint {tuple(meta.size)} vs model {tuple(value.shape)}")
    if problems:
        raise ValueError(f"load_checkpoint: {path} does not fit the model; nothing was loaded: " + "; ".join(problems))


def load_checkpoint(path: str, model: nn.Module, optimizer=None) -> None:
    """Load a save_checkpoint directory into a model (and optimizer) of any layout: DCP reshards every tensor.
    Checked first on every rank (complete, same names and shapes); loaded into copies, applied only when all read."""
    dcp, get_state_dict, set_state_dict = _dcp()
    path = os.path.abspath(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    _check_loadable(path, model_sd)
    state = {"model": _detached_copy(model_sd), "optim": _detached_copy(optim_sd)}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


def _detached_copy(tree):
    if isinstance(tree, dict):
        return {k: _detached_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_detached_copy(v) for v in tree]
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree
