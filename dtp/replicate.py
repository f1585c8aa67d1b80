"""Modules a plan does not split: their parameters become replicated DTensors too, so a whole model is
all-DTensor (optimizers with foreach/fused kernels, clip_grad_norm_ and state dicts never meet a
"mixed torch.Tensor and DTensor" error), while their forward still runs on plain local tensors."""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from .params import shard_parameter
from .views import to_local

__all__ = ["replicate_parameters_", "local_parameters", "replicate_remaining_"]


def _replicate_own_(module: nn.Module, mesh: DeviceMesh) -> bool:
    """module's own plain parameters become replicated DTensor parameters; True if there were any."""
    changed = False
    for name, param in list(module._parameters.items()):
        if param is not None and not isinstance(param, DTensor):
            module._parameters[name] = shard_parameter(param, mesh, Replicate(), requires_grad=param.requires_grad)
            changed = True
    return changed


def replicate_parameters_(module: nn.Module, mesh: DeviceMesh) -> None:
    """Turn every plain parameter of module (recursively) into a replicated DTensor parameter (no communication)."""
    for owner in module.modules():
        _replicate_own_(owner, mesh)


@contextmanager
def local_parameters(module: nn.Module, to_local, recurse: bool = True):
    """Within the block, module's DTensor parameters read as to_local(param) (differentiable local views)."""
    swapped = []
    try:
        for owner in (module.modules() if recurse else (module,)):
            for name, param in list(owner._parameters.items()):
                if isinstance(param, DTensor):
                    swapped.append((owner, name, param))
                    owner._parameters[name] = to_local(param)
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def _has_dtensor(values) -> bool:
    return any(isinstance(v, DTensor) for v in values)


def replicated_forward(self, *args, **kwargs):
    """The module's own forward; on plain inputs its replicated parameters read as local tensors (no collective)."""
    if _has_dtensor(args) or _has_dtensor(kwargs.values()):
        return type(self).forward(self, *args, **kwargs)  # DTensor inputs: DTensor semantics
    with local_parameters(self, to_local, recurse=False):
        return type(self).forward(self, *args, **kwargs)


def replicate_remaining_(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every module a plan left alone that owns plain parameters gets replicated DTensor ones and a local-tensor forward."""
    for module in model.modules():
        if "forward" not in vars(module) and _replicate_own_(module, mesh):
            module.forward = MethodType(replicated_forward, module)
