"""Running a module on the local tensors of its DTensor parameters (differentiable views; no collective)."""

from __future__ import annotations

from contextlib import contextmanager
from torch import nn
from torch.distributed.tensor import DTensor

from dtp.runtime.traced import module_forward_on_dtensors, traced_as
from dtp.runtime.conversions import to_local, to_locals

__all__ = ["local_parameters", "local_forward"]


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


def _traced_local_forward(module: nn.Module, args, kwargs, read_local=to_local):
    if read_local is to_local and not _has_dtensor(args) and not (kwargs and _has_dtensor(kwargs.values())):
        mesh = next(p.device_mesh for owner in module.__dict__.get("_dtp_reads", (module,))
                    for p in owner._parameters.values() if isinstance(p, DTensor))
        return module_forward_on_dtensors(module, mesh, args, kwargs)  # on replicated DTensors (no collective)
    return local_forward.eager(module, args, kwargs, read_local)


@traced_as(_traced_local_forward)
def local_forward(module: nn.Module, args, kwargs, read_local=to_local):
    """module's own forward; on plain inputs the DTensor parameters it reads (its own, and those of the submodules no
    style split: `module._dtp_reads`) as read_local(param) (no collective by default), on DTensor inputs it runs on
    DTensors (DTensor semantics)."""
    if _has_dtensor(args) or (kwargs and _has_dtensor(kwargs.values())):
        return type(module).forward(module, *args, **kwargs)
    swapped = _swap_in_locals(module.__dict__.get("_dtp_reads", (module,)), read_local)  # the hot path: no `with`
    try:
        return type(module).forward(module, *args, **kwargs)
    finally:
        _restore(swapped)
