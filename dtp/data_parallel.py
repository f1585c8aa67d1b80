"""DDP for models whose parameters are DTensors (TP x DDP): gradients averaged over the dp axis during backward.

torch's DistributedDataParallel cannot hold DTensor parameters (its constructor broadcasts them
through an op DTensor has no rule for), and its documented work-around swaps the module's
parameters for new objects on every forward (measured: they drop out of `parameters()`).  This
does what DDP does, on the parameters' local shards, with torch's functional collectives: each
gradient's all-reduce starts as soon as autograd has accumulated it, and backward ends after
they all finished.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dtp.runtime.collectives import AxisGroup, all_reduce
from dtp.mesh import check_member

__all__ = ["replicate_over"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class _GradientAverager:
    """Post-accumulate-grad hooks that all-reduce each gradient over the axis; the last backward callback waits."""

    def __init__(self, axis: AxisGroup):
        self.axis = axis
        self.pending: list = []

    def __call__(self, param: torch.Tensor) -> None:
        grad = _local(param.grad)
        if not self.pending:
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self.pending.append((grad, all_reduce(grad, self.axis, inplace=True)))

    def finish(self) -> None:
        for grad, pending in self.pending:
            grad.copy_(pending.wait()).div_(self.axis.size)
        self.pending.clear()


def replicate_over(model: nn.Module, dp_mesh: DeviceMesh, *, parameters=None, broadcast: bool = True) -> nn.Module:
    """DDP semantics on the dp axis: parameters equal across dp ranks (broadcast from dp rank 0 once), grads averaged
    (all-reduce per parameter) in backward.  `parameters`: only these (default: all of the model's, and its buffers)."""
    check_member(dp_mesh, "replicate_over")
    if dp_mesh.ndim != 1:
        raise ValueError(f"replicate_over: dp_mesh must be 1-D (e.g. mesh['dp']), got a {dp_mesh.ndim}-D mesh")
    axis = AxisGroup.of(dp_mesh)
    group = dp_mesh.get_group()
    params = list(model.parameters()) if parameters is None else list(parameters)
    if axis.size == 1:
        return model
    if broadcast:
        src = dist.get_global_rank(group, 0)
        with torch.no_grad():
            for tensor in params + (list(model.buffers()) if parameters is None else []):
                dist.broadcast(_local(tensor), src=src, group=group)
    averager = _GradientAverager(axis)
    for param in params:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(averager)
            param._dtp_dp_averaged = True  # for dtp.comms.predict
    return model
