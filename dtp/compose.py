"""2-D parallelism: TP on mesh["tp"], then FSDP2 (`fully_shard`) or DDP on mesh["dp"]; a clip_grad_norm_ for any mix of meshes."""

from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from dtp.runtime.collectives import group_is_alive
from dtp.data_parallel import replicate_over
from dtp.mesh import check_member
from dtp.plan.parallelize import _matches, parallelize_module

__all__ = ["parallelize_2d", "fully_shard", "clip_grad_norm_"]


def _avg_reduce_scatter_sums(mesh: DeviceMesh) -> bool:
    """True where a reduce-scatter with ReduceOp.AVG silently sums instead (gloo before torch 2.8 does):
    FSDP2's gradients would then come out dp times too large.  One tiny probe per process group."""
    group = mesh.get_group()
    if mesh.size() == 1 or dist.get_backend(group) != "gloo":
        return False
    for probed, sums in _AVG_PROBES:
        if probed is group:  # by identity: a group made after a re-init is probed afresh
            return sums
    out = torch.empty(1)
    with warnings.catch_warnings():  # newer torch renames the call; the probe is about older ones
        warnings.simplefilter("ignore", FutureWarning)
        dist.reduce_scatter_tensor(out, torch.ones(mesh.size()), op=dist.ReduceOp.AVG, group=group)
    _AVG_PROBES[:] = [(g, r) for g, r in _AVG_PROBES if group_is_alive(g)] + [(group, bool(out.item() > 1.5))]
    return _AVG_PROBES[-1][1]


_AVG_PROBES: list = []  # [(process group, whether its AVG reduce-scatter sums)], live groups only


def fully_shard(module: nn.Module, *, mesh: DeviceMesh, **kwargs) -> nn.Module:
    """torch's FSDP2 fully_shard (shards on mesh, all-gather forward, reduce-scatter backward), with gradients
    averaged over the mesh even where the backend's ReduceOp.AVG sums (then through FSDP's own all-reduce hook)."""
    try:
        from torch.distributed.fsdp import fully_shard as torch_fully_shard
    except ImportError:  # torch < 2.6 kept it under _composable
        from torch.distributed._composable.fsdp import fully_shard as torch_fully_shard
    check_member(mesh, "fully_shard")
    module = torch_fully_shard(module, mesh=mesh, **kwargs)
    if _avg_reduce_scatter_sums(mesh):
        size = mesh.size()
        module.set_all_reduce_hook(lambda grad: grad.div_(size))
    return module


def parallelize_2d(model: nn.Module, device_mesh: DeviceMesh, parallelize_plan: dict, *,
                   data_parallel: str = "fsdp", fsdp_units: Iterable[str] = (), **fsdp_kwargs) -> nn.Module:
    """TP by the plan on the "tp" axis, then data parallel on the "dp" axis: "fsdp" = fully_shard each module
    matching an fsdp_units pattern and then the root (torch's 2-D order); "ddp" = gradients all-reduced over dp."""
    check_member(device_mesh, "parallelize_2d")
    names = device_mesh.mesh_dim_names or ()
    if device_mesh.ndim != 2 or set(names) != {"dp", "tp"}:
        raise ValueError(f"parallelize_2d: device_mesh must be 2-D with axes named 'dp' and 'tp' "
                         f"(dtp.init_mesh(dp=..., tp=...)), got shape {tuple(device_mesh.shape)} and names {names}")
    if data_parallel not in ("fsdp", "ddp"):
        raise ValueError(f"parallelize_2d: data_parallel must be 'fsdp' or 'ddp', got {data_parallel!r}")
    units = list(fsdp_units)
    if units and data_parallel != "fsdp":
        raise ValueError("parallelize_2d: fsdp_units only apply with data_parallel='fsdp'")
    paths = [name for name, _ in model.named_modules()]
    unit_paths = []
    for pattern in units:
        hits = [p for p in paths if p and _matches(pattern, p)]
        if not hits:
            raise ValueError(f"parallelize_2d: fsdp_units pattern {pattern!r} matches no module")
        unit_paths += hits
    parallelize_module(model, device_mesh["tp"], parallelize_plan)
    if data_parallel == "ddp":
        return replicate_over(model, device_mesh["dp"])
    # torch 2.7 refuses FSDP on a dim TP already splits unevenly over dp x tp: such matrices are
    # sharded on dim 1 instead, and such vectors are kept whole, their gradients averaged like DDP's.
    awkward = [p for p in model.parameters() if _uneven_on_tp_dim0(p, device_mesh.size())]
    fsdp_kwargs.setdefault("shard_placement_fn", lambda p: Shard(1) if _uneven_on_tp_dim0(p, device_mesh.size()) else Shard(0))
    vectors = {p for p in awkward if p.dim() == 1}
    if vectors:
        fsdp_kwargs["ignored_params"] = set(fsdp_kwargs.get("ignored_params") or ()) | vectors
        replicate_over(model, device_mesh["dp"], parameters=vectors)
    for path in unit_paths:
        fully_shard(model.get_submodule(path), mesh=device_mesh["dp"], **fsdp_kwargs)
    fully_shard(model, mesh=device_mesh["dp"], **fsdp_kwargs)
    return model


def _uneven_on_tp_dim0(param, shards: int) -> bool:
    return isinstance(param, DTensor) and param.placements[-1] == Shard(0) and param.shape[0] % shards != 0


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / ‖g‖) with ‖g‖ the norm over every parameter, whatever mesh (or none) each lives on;
    one reduction per mesh (DTensor's own), returns the total norm as a plain tensor."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict = {}
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    norm_type = float(norm_type)
    norms = []
    for key, members in groups.items():
        local = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, norm_type) for g in members]),
                                         norm_type)
        norms.append(local.full_tensor() if isinstance(local, DTensor) else local)
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, torch.float64) for n in norms]), norm_type)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} is {float(total)}")
    coefficient = min(1.0, float(max_norm) / (float(total) + 1e-6))
    if coefficient < 1.0:
        for g in grads:
            (g._local_tensor if isinstance(g, DTensor) else g).mul_(coefficient)
    return total.to(grads[0].dtype if not isinstance(grads[0], DTensor) else grads[0]._local_tensor.dtype)
