"""FSDP2 on experts that ExpertParallel split over ep: sharded over efsdp (the ranks holding the same experts), their
gradients divided by the whole dp size, as FSDP2 divides the dense ones (torchtitan's gradient_divide_factor)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule

from dtp.compose import fully_shard

__all__ = ["fully_shard_experts"]


def fully_shard_experts(experts: nn.Module, mesh, **kwargs) -> nn.Module:
    """fully_shard(experts) over mesh["efsdp"] (all-gather forward, reduce-scatter backward) with dW = Σ_ranks dW_r / dp:
    every dp rank's tokens reached these experts through the all-to-alls, so the mean over dp divides by dp, not efsdp."""
    efsdp = mesh["efsdp"]
    backend = dist.get_backend(efsdp.get_group())
    if not hasattr(FSDPModule, "set_gradient_divide_factor") and backend != "nccl":
        raise NotImplementedError(  # torch 2.7: only NCCL's PREMUL_SUM reduce-scatter divides by another factor
            f"fully_shard_experts: dividing the experts' gradients by dp={mesh.size('dp')} needs "
            f"FSDPModule.set_gradient_divide_factor (a newer torch than {torch.__version__}) or NCCL's PREMUL_SUM "
            f"(set_reduce_scatter_divide_factor); this mesh's efsdp group runs on {backend}")
    module = fully_shard(experts, mesh=efsdp, **kwargs)
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(float(mesh.size("dp")))
    else:
        module.set_reduce_scatter_divide_factor(float(mesh.size("dp")))
    # a sum, then a division: gloo has no PREMUL_SUM (on one efsdp rank nothing is reduced: FSDP2 divides once as is,
    # and would divide twice with the forced sum, measured on torch 2.13)
    if mesh.size("efsdp") > 1 and hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)
    return module
