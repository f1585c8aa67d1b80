"""Replicated DTensor parameters for modules a plan does not split, and running a module on its local parameters.

After a plan every parameter is a DTensor (optimizers with foreach/fused kernels, clip_grad_norm_
and state dicts never meet a "mixed torch.Tensor and DTensor" error), while the modules a plan
left alone still compute on plain local tensors.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from .params import shard_parameter
from .traceable import is_compiling, module_forward_on_dtensors
from .dtensor_conversions import to_local, to_locals

__all__ = ["replicate_own_", "replicate_parameters_", "local_parameters", "local_forward", "replicate_remaining_"]


def replicate_own_(module: nn.Module, mesh: DeviceMesh) -> bool:
    """module's own plain parameters become replicated DTensor parameters (frozen stay frozen); True if any did."""
    changed = False
    for name, param in list(module._parameters.items()):
        if param is not None and not isinstance(param, DTensor):
            module._parameters[name] = shard_parameter(param, mesh, Replicate(), what=f"parameter {name!r}")
            changed = True
    return changed


def replicate_parameters_(module: nn.Module, mesh: DeviceMesh) -> None:
    """Turn every plain parameter of module (recursively) into a replicated DTensor parameter (no communication)."""
    for owner in module.modules():
        replicate_own_(owner, mesh)


def _swap_in_locals(owners, read_local) -> list:
    """Replace the DTensor parameters of each owner module (its own, not its children's) by read_local(param), the
    default to_local reading them all through one autograd node; returns [(owner, name, param)] to restore."""
    swapped = [(owner, name, param) for owner in owners
               for name, param in owner._parameters.items() if isinstance(param, DTensor)]
    if swapped:
        locals_ = (to_locals([p for _, _, p in swapped]) if read_local is to_local
                   else [read_local(p) for _, _, p in swapped])
        for (owner, name, _), local in zip(swapped, locals_):
            owner._parameters[name] = local
    return swapped


def _restore(swapped: list) -> None:
    for owner, name, param in swapped:
        owner._parameters[name] = param


@contextmanager
def local_parameters(module: nn.Module, read_local, recurse: bool = True):
    """Within the block, module's DTensor parameters read as read_local(param) (differentiable local views; the
    default to_local reads them all through one autograd node)."""
    swapped = []
    try:
        swapped = _swap_in_locals(module.modules() if recurse else (module,), read_local)
        yield
    finally:
        _restore(swapped)


def _has_dtensor(values) -> bool:
    for v in values:
        if isinstance(v, DTensor):
            return True
    return False


def local_forward(module: nn.Module, args, kwargs, read_local=to_local):
    """module's own forward; on plain inputs its own DTensor parameters read as read_local(param) (no collective by
    default), on DTensor inputs it runs on DTensors (DTensor semantics)."""
    if _has_dtensor(args) or (kwargs and _has_dtensor(kwargs.values())):
        return type(module).forward(module, *args, **kwargs)
    if is_compiling() and read_local is to_local:  # traced: on replicated DTensors (no collective), local out
        mesh = next(p.device_mesh for p in module._parameters.values() if isinstance(p, DTensor))
        return module_forward_on_dtensors(module, mesh, args, kwargs)
    swapped = _swap_in_locals((module,), read_local)  # local_parameters without a context manager: the hot path
    try:
        return type(module).forward(module, *args, **kwargs)
    finally:
        _restore(swapped)


def replicated_forward(self, *args, **kwargs):
    """The module's own forward on its replicated parameters' local tensors (no collective)."""
    return local_forward(self, args, kwargs)


def replicate_remaining_(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every module a plan left alone that owns plain parameters gets replicated DTensor ones and a local-tensor forward."""
    for module in model.modules():
        if "forward" not in vars(module) and replicate_own_(module, mesh):
            module.forward = MethodType(replicated_forward, module)
