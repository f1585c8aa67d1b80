"""The parallel_linear contract: Column/RowParallelLinear(in_features, out_features, bias, master_weight).

A thin face over dtp on the default process group.  Parameters are plain `nn.Parameter`s that
hold exactly this rank's slice; `forward` wraps them with `DTensor.from_local` and runs dtp's
core (`dtp.ops.linear`), so there is one implementation with two faces.

- Column keeps weight rows [rank*out/ws, (rank+1)*out/ws) and a bias of out/ws zeros; it takes the
  full input (..., in_features) and returns the full output (..., out_features) on every rank.
- Row keeps weight columns [rank*in/ws, (rank+1)*in/ws) and a full bias of out_features zeros; it
  takes this rank's input slice (..., in_features/ws) and returns the full, summed output, bias once.

Import needs no install: put the checkout on sys.path.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn
import torch.distributed as dist

if __package__ in (None, "") and os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dtp.ops.linear import column_linear, row_linear  # noqa: E402
from dtp.layers import _check_features, _check_master_weight, linear_init_  # noqa: E402
from dtp.mesh import check_divisible, default_mesh  # noqa: E402
from dtp.runtime.conversions import from_local  # noqa: E402
from torch.distributed.tensor import Replicate, Shard  # noqa: E402

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]

_INIT_SEED = 1234  # draws for a missing master_weight use a private generator, never the global one


class _ContractLinear(nn.Module):
    """Shared checks and slicing; `split_dim` is 0 for Column (rows) and 1 for Row (columns)."""

    split_dim: int

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 master_weight: torch.Tensor | None = None):
        super().__init__()
        name = type(self).__name__
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{name}: no initialised process group; call "
                               f"torch.distributed.init_process_group(...) first")
        _check_features(name, in_features, out_features)
        world, rank = dist.get_world_size(), dist.get_rank()
        split_name, split_size = (("out_features", out_features) if self.split_dim == 0
                                  else ("in_features", in_features))
        check_divisible(name, split_name, split_size, world)
        if master_weight is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            master_weight = torch.empty(out_features, in_features, device=device)
            linear_init_(master_weight, None, generator=torch.Generator(device=master_weight.device).manual_seed(_INIT_SEED))
        else:
            master_weight = _check_master_weight(name, master_weight, out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.world_size, self.rank = world, rank
        self._mesh = default_mesh()
        part = split_size // world
        local = master_weight.narrow(self.split_dim, rank * part, part).clone().contiguous()
        self.weight = nn.Parameter(local)
        bias_size = part if self.split_dim == 0 else out_features
        self.bias = nn.Parameter(torch.zeros(bias_size, dtype=local.dtype, device=local.device)) if bias else None

    def _as_dtensors(self):
        """This rank's plain parameters as DTensors of the full layer (differentiable, no communication)."""
        full_w = (self.out_features, self.in_features)
        weight = from_local(self.weight, self._mesh, Shard(self.split_dim), full_w)
        bias = None
        if self.bias is not None:
            bias = from_local(self.bias, self._mesh, Shard(0) if self.split_dim == 0 else Replicate(),
                                      (self.out_features,))
        return weight, bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, world_size={self.world_size}, rank={self.rank}")


class ColumnParallelLinear(_ContractLinear):
    """Y = X Wᵀ + b with W's rows split over ranks; full X in, full Y out (forward all-gather, backward all-reduce of dX)."""

    split_dim = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._as_dtensors()
        return column_linear(x, weight, bias, gather_output=True)


class RowParallelLinear(_ContractLinear):
    """Y = Σ_ranks X_r W_rᵀ + b with W's columns split over ranks; X slice in, full Y out (forward all-reduce)."""

    split_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._as_dtensors()
        return row_linear(x, weight, bias, input_is_parallel=True)
