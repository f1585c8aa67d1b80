"""Replicated DTensor parameters for modules a plan does not split.

After a plan every parameter is a DTensor (optimizers with foreach/fused kernels, clip_grad_norm_
and state dicts never meet a "mixed torch.Tensor and DTensor" error), while the modules a plan
left alone still compute on plain local tensors (dtp.ops.local_forward).  A module reads its local
tensors and those of every submodule below it that no style split (`module._dtp_reads`): a module that
calls F.conv1d on its child's weight, as the linear attention of Qwen3.5 and OLMo-hybrid does, or that
reads a child's buffer, never meets a mixed torch.Tensor and DTensor.
"""

from __future__ import annotations

from types import MethodType

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from dtp.ops.local_forward import local_forward
from dtp.runtime.sharding import shard_parameter

CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # no forward of their own: their parent calls their children

__all__ = ["replicate_own_", "replicate_parameters_", "replicate_remaining_", "replicated_forward"]


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


def replicated_forward(self, *args, **kwargs):
    """The module's own forward on its replicated parameters' local tensors (no collective)."""
    return local_forward(self, args, kwargs)


def unsplit_subtree(module: nn.Module) -> list:
    """module and every submodule below it that no style split (the walk stops at a styled module)."""
    found, todo = [module], list(module.children())
    while todo:
        child = todo.pop()
        if not hasattr(child, "_dtp_style"):
            found.append(child)
            todo.extend(child.children())
    return found


def _holds_styles(model: nn.Module) -> set:
    """ids of the modules at or above a styled module (their subtree holds one)."""
    holders = set()
    for path, module in model.named_modules():
        if hasattr(module, "_dtp_style"):
            parts = path.split(".") if path else []
            for i in range(len(parts) + 1):
                holders.add(id(model.get_submodule(".".join(parts[:i]))))
    return holders


def replicate_remaining_(model: nn.Module, mesh: DeviceMesh) -> None:
    """Every module a plan left alone that owns plain parameters, and every root of a part no style reaches (a router
    that calls F.linear on its child's weight), gets replicated DTensor parameters and a local-tensor forward that reads
    its own and its unsplit submodules' parameters as local tensors (no collective)."""
    holders = _holds_styles(model)
    parents = {}
    for owner in model.modules():  # a module's caller: its nearest ancestor that is not a ModuleList / ModuleDict
        for child in owner.children():
            parents[id(child)] = parents.get(id(owner), owner) if isinstance(owner, CONTAINERS) else owner
    for module in model.modules():
        if "forward" not in vars(module) and replicate_own_(module, mesh):
            module.forward = MethodType(replicated_forward, module)
        elif ("forward" not in vars(module) and not isinstance(module, CONTAINERS) and id(module) not in holders
              and id(parents.get(id(module))) in holders and any(True for _ in module.parameters())):
            # the root of a part no style reaches, called from one that some do
            module.forward = MethodType(replicated_forward, module)  # its submodules' turn comes next (pre-order)
        installed = getattr(vars(module).get("forward"), "__func__", None) is replicated_forward
        if installed and id(module) in holders and not any(p is not None for p in module._parameters.values()):
            del module.forward  # a part root an earlier call saw, whose part a later call split (torchtitan's order)
            vars(module).pop("_dtp_reads", None)
            continue
        if installed:  # again after each call
            owners = unsplit_subtree(module)
            if len(owners) > 1:
                module._dtp_reads = owners
            else:
                vars(module).pop("_dtp_reads", None)
