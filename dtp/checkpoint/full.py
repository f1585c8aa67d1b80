"""Full (unsharded) state dicts of parallelized models: gathered without hanging, loaded back as slices.
(Sharded checkpoints that reshard to any layout are in dtp.sharded_checkpoint.)  Packed projections (dtp.ops.packed)
are given and taken in their original layout."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dtp.ops.packed import PackedLayout, named_layouts

__all__ = ["full_state_dict", "load_full_state_dict", "plain_name", "unwrap", "packed_layouts"]

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


def packed_layouts(model: nn.Module) -> dict[str, PackedLayout]:
    """{plain name: PackedLayout} of model's packed parameters (layout.unpack(p.grad.full_tensor()) is the gradient in
    the original layout); {} for a model without packed projections.  No communication."""
    return {plain_name(name): layout for name, layout in named_layouts(unwrap(model))}


def full_state_dict(model: nn.Module, *, rank0_only: bool = False, cpu_offload: bool = False) -> dict:
    """{plain name: full plain tensor}; every rank gathers every DTensor in the same order (all-gathers), so none waits forever.

    rank0_only: other ranks take part in the gathers but return {}.  cpu_offload: tensors are moved to CPU.
    """
    out = {}
    keep = not rank0_only or not dist.is_initialized() or dist.get_rank() == 0
    layouts = packed_layouts(model)
    for name, value in unwrap(model).state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
            if keep and plain_name(name) in layouts:  # packed projections: back in their original layout
                value = layouts[plain_name(name)].unpack(value)
        if keep:
            value = value.detach()
            out[plain_name(name)] = value.cpu() if cpu_offload else value.clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict, *, strict: bool = True) -> None:
    """Copy a full state dict into a (parallelized) model: each rank keeps its slice of each tensor (no collective).

    Everything is checked first (names, global shapes) on every rank, so a mismatch loads nothing.  Packed
    projections take their original layout (each rank keeps its slice of every block).
    """
    targets = {plain_name(n): t for n, t in unwrap(model).state_dict(keep_vars=True).items()}
    layouts = packed_layouts(model)
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
            if name in layouts:
                full = layouts[name].pack(full.to(device=target.device))
            local = distribute_tensor(full.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                      target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(full)
