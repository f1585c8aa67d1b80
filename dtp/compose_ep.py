"""FSDP2 on experts that ExpertParallel split over ep: sharded over efsdp (the ranks holding the same experts), their
gradients divided by the whole dp size, as FSDP2 divides the dense ones (torchtitan's gradient_divide_factor)."""

from __future__ import annotations

from torch import nn

from dtp.compose import fully_shard

__all__ = ["fully_shard_experts"]


def fully_shard_experts(experts: nn.Module, mesh, **kwargs) -> nn.Module:
    """fully_shard(experts) over mesh["efsdp"] (all-gather forward, reduce-scatter backward) with dW = Σ_ranks dW_r / dp:
    every dp rank's tokens reached these experts through the all-to-alls, so the mean over dp divides by dp, not efsdp."""
    module = fully_shard(experts, mesh=mesh["efsdp"], **kwargs)
    module.set_gradient_divide_factor(float(mesh.size("dp")))
    # a sum, then a division: gloo has no PREMUL_SUM (on one efsdp rank nothing is reduced: FSDP2 divides once as is,
    # and would divide twice with the forced sum, measured on torch 2.13)
    if mesh.size("efsdp") > 1 and hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)
    return module
