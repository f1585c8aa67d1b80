"""Transformers' `unit_colwise` / `unit_rowwise`: a projection split by whole heads ("units"), also where there are
fewer heads than ranks (a GQA key/value projection with num_key_value_heads < tp).

With H heads of head_dim on tp ranks, the ranks form G = gcd(H, tp) groups of R = tp / G consecutive ranks; group g
holds heads [g·H/G, (g+1)·H/G), the same on each of its R ranks (transformers' `get_unit_mesh`: the tp mesh viewed as
(G, R)).  Where tp divides H (G = tp, R = 1) that is ColwiseParallel() / RowwiseParallel() exactly, and the plan
resolves the string to them (`resolve_unit_style`).  Otherwise (R > 1):

    UnitColwiseParallel  W, b replicated DTensors; each rank computes its group's heads, Y_r = X W_g^T + b_g (a local
                         tensor); no forward collective; backward all-reduce over tp of dX (copy_to) and of dW, db
                         (each rank's share is its own query heads' part of the key/value gradient)
    UnitRowwiseParallel  W replicated; each rank reads its group's columns: Y = Σ_ranks X_r W_g^T / R + b (forward
                         all-reduce: each group's heads counted once), backward all-reduce of dW; b replicated

Transformers keeps such weights split on a 2-D (G, R) mesh and all-reduces the key/value output gradient over the
R replicas; dtp keeps them whole on the tp mesh and sums their gradient over tp: the same values (the tests compare
with one process), one axis, plain Replicate parameters in checkpoints; the cost is the whole projection on every
rank (small: it has fewer heads than ranks).
"""

from __future__ import annotations

import math
from types import MethodType

import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate

from dtp.plan.replicated import replicate_own_
from dtp.plan.styles import ColwiseParallel, RowwiseParallel, has_own_forward
from dtp.runtime.collectives import axis_of
from dtp.runtime.conversions import replicated_local, to_local
from dtp.runtime.mappings import copy_to, reduce_from
from dtp.runtime.traced import replicated_grad_local, traced_as

__all__ = ["UnitColwiseParallel", "UnitRowwiseParallel", "resolve_unit_style", "config_head_dim"]


def config_head_dim(model: nn.Module):
    """head_dim as transformers reads it for the unit styles: config.head_dim, else hidden_size // num_attention_heads."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(config, "head_dim", None)
    if not head_dim and getattr(config, "num_attention_heads", None):
        head_dim = config.hidden_size // config.num_attention_heads
    return head_dim


class _UnitStyle:
    """The head grouping both unit styles share (mixed into ColwiseParallel / RowwiseParallel: LoRA and the plan's
    checks see a column / row split)."""

    fits = (nn.Linear,)
    split: str  # the features split by heads: out_features (column) or in_features (row)

    def __init__(self, *, head_dim: int | None = None):
        super().__init__()
        self.head_dim = head_dim

    def groups(self, module: nn.Module, tp: int, where: str) -> int:
        """G = gcd(heads, tp) for module's split features (ValueError unless they are whole heads of head_dim)."""
        features = getattr(module, self.split)
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"{where}: {type(self).__name__} needs head_dim (the model's config has neither head_dim "
                             f"nor num_attention_heads); pass {type(self).__name__}(head_dim=...)")
        if features % self.head_dim:
            raise ValueError(f"{where}: {type(self).__name__} splits {self.split}={features} by heads of head_dim="
                             f"{self.head_dim}, which does not divide it")
        return math.gcd(features // self.head_dim, tp)

    def check(self, module, mesh, where) -> None:
        super().check(module, mesh, where)
        if has_own_forward(module):
            raise ValueError(f"{where}: {type(self).__name__} with fewer heads than ranks runs nn.Linear's math; "
                             f"{type(module).__module__}.{type(module).__name__} has a forward of its own")
        self.groups(module, mesh.size(), where)

    def placements(self, module) -> dict:
        return {name: Replicate() for name, p in module._parameters.items() if p is not None}

    def _apply(self, module, mesh) -> None:
        replicate_own_(module, mesh)
        tp = mesh.size()
        groups = self.groups(module, tp, module._dtp_path)
        width = getattr(module, self.split) // groups  # a group's heads' features
        module._dtp_unit = (mesh.get_local_rank() // (tp // groups) * width, width, tp // groups)
        module.forward = MethodType(self.forward_fn, module)


def _replicated_input(x):
    if isinstance(x, DTensor):
        return x.redistribute(x.device_mesh, [Replicate()] * x.device_mesh.ndim).to_local()
    return x


def _traced_unit_colwise(self, x):  # DTensor's ops and functional collectives: copy_to as Replicate -> Partial grad
    start, width, _ = self._dtp_unit
    x = DTensor.from_local(_replicated_input(x), self._dtp_mesh, [Replicate()], run_check=False)
    weight = replicated_grad_local(self.weight).narrow(0, start, width)
    bias = None if self.bias is None else replicated_grad_local(self.bias).narrow(0, start, width)
    return F.linear(x.to_local(grad_placements=[Partial()]), weight, bias)


@traced_as(_traced_unit_colwise)
def _unit_colwise_forward(self, x):
    start, width, _ = self._dtp_unit
    mesh = self._dtp_mesh
    weight = replicated_local(self.weight, mesh).narrow(0, start, width)
    bias = None if self.bias is None else replicated_local(self.bias, mesh).narrow(0, start, width)
    return F.linear(copy_to(_replicated_input(x), axis_of(mesh)), weight, bias)


def _traced_unit_rowwise(self, x):
    start, width, replicas = self._dtp_unit
    x = x.to_local() if isinstance(x, DTensor) else x
    partial = F.linear(x, replicated_grad_local(self.weight).narrow(1, start, width)) / replicas
    y = DTensor.from_local(partial, self._dtp_mesh, [Partial()], run_check=False).redistribute(
        self._dtp_mesh, [Replicate()]).to_local()
    return y if self.bias is None else y + self.bias.to_local()


@traced_as(_traced_unit_rowwise)
def _unit_rowwise_forward(self, x):
    start, width, replicas = self._dtp_unit
    mesh = self._dtp_mesh
    x = to_local(x) if isinstance(x, DTensor) else x
    weight = replicated_local(self.weight, mesh).narrow(1, start, width)
    y = reduce_from(F.linear(x, weight) / replicas, axis_of(mesh))
    return y if self.bias is None else y + to_local(self.bias)


class UnitColwiseParallel(_UnitStyle, ColwiseParallel):
    """Transformers' unit_colwise: whole heads per rank, a group of tp/G ranks sharing each G-th of them (G = gcd(heads,
    tp)); Y_r = X W_g^T + b_g, no forward collective, backward all-reduce of dX, dW and db over tp."""

    split = "out_features"
    forward_fn = staticmethod(_unit_colwise_forward)


class UnitRowwiseParallel(_UnitStyle, RowwiseParallel):
    """Transformers' unit_rowwise: the input is this rank's group's heads; Y = Σ_ranks X_r W_g^T / (tp/G) + b, forward
    all-reduce, backward all-reduce of dW over tp."""

    split = "in_features"
    forward_fn = staticmethod(_unit_rowwise_forward)


def resolve_unit_style(style, model: nn.Module, attention: nn.Module, target: nn.Module, tp: int, where: str):
    """The style a unit_* entry means at this tp: ColwiseParallel() / RowwiseParallel() where tp divides the heads,
    else the unit style with its head_dim (unless given: the model config's, as transformers, else the head_dim of
    the module holding the projection); other styles unchanged."""
    if not isinstance(style, _UnitStyle):
        return style
    if style.head_dim is None:
        style = type(style)(head_dim=config_head_dim(model) or getattr(attention, "head_dim", None))
    if not isinstance(target, nn.Linear):
        return style  # its check names the module type
    if style.groups(target, tp, where) == tp:
        return ColwiseParallel() if isinstance(style, ColwiseParallel) else RowwiseParallel()
    return style
