"""Styles for mixture-of-experts modules split over tp, with transformers' meanings (its `moe_tp_experts` and
`moe_identity_expert` plan strings):

    MoeExpertsParallel   an experts module whose stacked expert weights its plan splits (gate_up_proj packed
                         colwise, down_proj rowwise): every rank runs its shard of every expert on all the tokens;
                         forward all-reduce of the output, backward all-reduce of the tokens' and routing weights'
                         gradients (Megatron's copy_to / reduce_from around the experts)
    AllReduceParallel    transformers' `all_reduce` (on shared experts): the module's output is a sum over the ranks
                         made whole (all-reduce); when the plan split the module's own parameters, it runs on
                         their shards with its floating inputs' gradients all-reduced too, as MoeExpertsParallel
    MoeIdentityParallel  an identity "expert" beside such experts: its input divided by tp, so that the experts'
                         all-reduce counts it once
    MlaKvAProjParallel   MLA's kv_a_proj_with_mqa (DeepSeek-V2 style, transformers' `mla_kv_a_proj`): a whole
                         projection whose output's last rope_dim features (k_rot) go straight to the split heads:
                         their gradient all-reduced in backward (copy_to); the rest reaches a colwise kv_b_proj
"""

from __future__ import annotations

from types import MethodType

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from dtp.ops.local_forward import local_forward
from dtp.plan.module_io import PrepareModuleOutput
from dtp.plan.own_layout import check_own_layout
from dtp.plan.style import ParallelStyle
from dtp.runtime.collectives import axis_of
from dtp.runtime.conversions import to_local
from dtp.runtime.mappings import copy_to, reduce_from

__all__ = ["MoeExpertsParallel", "AllReduceParallel", "MoeIdentityParallel", "MlaKvAProjParallel"]


def _replicated_local(value, axis):
    """A replicated input as this rank's plain tensor whose gradient is summed over the axis (copy_to)."""
    if isinstance(value, DTensor):
        value = to_local(value)
    return copy_to(value, axis) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _experts_forward(self, hidden_states, *routing, **kwargs):
    check_own_layout(self)
    axis = axis_of(self._dtp_mesh)
    hidden_states = _replicated_local(hidden_states, axis)
    if len(routing) >= 2:  # (top_k_index, top_k_weights, ...): the weights' gradient is summed over the ranks too
        routing = (routing[0], _replicated_local(routing[1], axis)) + tuple(routing[2:])
    out = local_forward(self, (hidden_states,) + routing, kwargs)
    return reduce_from(out, axis) if isinstance(out, torch.Tensor) else out


class MoeExpertsParallel(ParallelStyle):
    """Y = Σ_ranks experts_r(X, routing) with every expert's weights split by the plan's parameter entries; forward
    all-reduce of Y, backward all-reduce of dX and of the routing weights' gradient."""

    reads_own_shards = True  # runs on this rank's shard of every expert: dtp.plan.own_layout checks their layout

    def _apply(self, module, mesh) -> None:
        module.forward = MethodType(_experts_forward, module)


def _owns_shards(module) -> bool:
    return any(isinstance(p, DTensor) and not all(isinstance(q, Replicate) for q in p.placements)
               for p in module._parameters.values())


def _all_reduce_forward(self, *args, **kwargs):
    check_own_layout(self)
    if not _owns_shards(self):  # its children are split (rowwise leaves a partial sum): redistribute the output
        return self._dtp_style.output.prepare(self, type(self).forward(self, *args, **kwargs))
    axis = axis_of(self._dtp_mesh)
    args = tuple(_replicated_local(a, axis) for a in args)
    kwargs = {k: _replicated_local(v, axis) for k, v in kwargs.items()}
    out = local_forward(self, args, kwargs)
    return reduce_from(out, axis) if isinstance(out, torch.Tensor) else out


class AllReduceParallel(ParallelStyle):
    """Y = Σ_ranks module_r(X, ...): forward all-reduce of Y; on the module's own split parameters (shared experts'
    stacked weights) it runs on their shards and backward all-reduces every floating input's gradient (copy_to)."""

    reads_own_shards = True  # where it owns split parameters it runs on their shards: dtp.plan.own_layout checks them

    def __init__(self):
        self.output = PrepareModuleOutput(output_layouts=Partial(), desired_output_layouts=Replicate())

    def _apply(self, module, mesh) -> None:
        module.forward = MethodType(_all_reduce_forward, module)


def _identity_input(module, args, kwargs):
    return (args[0] / module._dtp_mesh.size(),) + tuple(args[1:]), kwargs


class MoeIdentityParallel(ParallelStyle):
    """An identity expert whose output the tp experts' all-reduce sums: Y = X / tp on every rank (no collective)."""

    def _apply(self, module, mesh) -> None:
        module.register_forward_pre_hook(_identity_input, with_kwargs=True)


class MlaKvAProjParallel(ParallelStyle):
    """Y = [Y_pass, copy_to(Y_rope)] of a whole (replicated) projection: no forward collective, backward all-reduce of
    the last rope_dim features' gradient (the split heads' shares of k_rot)."""

    def __init__(self, *, rope_dim: int | None = None):
        self.rope_dim = rope_dim

    def _apply(self, module, mesh) -> None:
        if self.rope_dim is None:
            raise ValueError(f"MlaKvAProjParallel({module._dtp_path!r}): rope_dim is unknown (the model's config has no "
                             f"qk_rope_head_dim); pass MlaKvAProjParallel(rope_dim=...)")
        module.register_forward_hook(self._split_rope)

    def _split_rope(self, module, args, out):
        axis = axis_of(module._dtp_mesh)
        local = to_local(out) if isinstance(out, DTensor) else out
        kv, rope = local.split([local.shape[-1] - self.rope_dim, self.rope_dim], dim=-1)
        return torch.cat([kv, copy_to(rope, axis)], dim=-1)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.rope_dim == self.rope_dim

