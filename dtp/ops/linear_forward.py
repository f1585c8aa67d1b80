"""Per-layer linear forwards with their layout decided once, at construction: the hot path.

A prepared forward caches the layer's collective group and shard sizes, and for the common cases
(a plain tensor or, for a column layer, a replicated DTensor of the right width in, a plain tensor
out) goes straight to the layer's autograd function; anything else (other DTensor inputs, DTensor
outputs, sequence-sharded inputs, other layouts, a wrong width, which gets its clear error there)
takes the general path in `dtp.ops.functional`.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from dtp.runtime.apply import direct_apply
from dtp.runtime.collectives import axis_of, chunk_sizes
from dtp.ops.functional import column_linear, row_linear
from dtp.ops.linear_autograd import ColumnLinearFn, RowLinearFn
from dtp.runtime.traced import is_compiling
from dtp.runtime.conversions import partial_spec

__all__ = ["ColumnForward", "RowForward"]

_REPLICATE = (Replicate(),)
_column = direct_apply(ColumnLinearFn)
_row = direct_apply(RowLinearFn)


class ColumnForward:
    """column_linear with the layout fixed: Y = X Wᵀ + b, W Shard(0); all-gather of Y if the output is Replicate."""

    def __init__(self, mesh: DeviceMesh, in_features: int, out_features: int, *, input_layout: Placement | None,
                 output_layout: Placement | None, use_local_output: bool, name: str = "ColumnParallelLinear"):
        self.axis = axis_of(mesh)
        self.in_features = in_features
        output_layout = output_layout or Shard(-1)
        gather = isinstance(output_layout, Replicate)
        self.out_sizes = chunk_sizes(out_features, self.axis.size) if gather else None
        self.options = dict(gather_output=gather, input_layout=input_layout, output_layout=output_layout,
                            use_local_output=use_local_output, name=name)
        self.fast = (use_local_output and isinstance(input_layout or Replicate(), Replicate)
                     and (gather or output_layout in (Shard(-1),)))
        self._seen = (None, None)  # the last replicated input's spec and its Partial twin (dX's spec)

    def __call__(self, x, weight, bias):
        if self.fast and x.shape[-1] == self.in_features and not is_compiling():
            if type(x) is torch.Tensor:
                return _column(x, weight, bias, self.axis, None, None, self.out_sizes)
            if type(x) is DTensor:  # a replicated one is read in place, dX handed back Partial
                spec, (seen, grad_spec) = x._spec, self._seen
                if spec is not seen and spec.placements == _REPLICATE:
                    grad_spec = partial_spec(spec)
                    self._seen = (spec, grad_spec)
                    seen = spec
                if spec is seen:
                    return _column(x, weight, bias, self.axis, grad_spec, None, self.out_sizes)
        return column_linear(x, weight, bias, **self.options)


class RowForward:
    """row_linear with the layout fixed: Y = Σ_r X_r W_rᵀ + b, W Shard(1); all-reduce (or reduce-scatter) of Y."""

    def __init__(self, mesh: DeviceMesh, in_features: int, *, input_layout: Placement | None,
                 output_layout: Placement | None, use_local_output: bool, name: str = "RowParallelLinear"):
        self.axis = axis_of(mesh)
        input_layout = input_layout or Shard(-1)
        self.in_sizes = chunk_sizes(in_features, self.axis.size)
        self.split_input = isinstance(input_layout, Replicate)
        self.expected = in_features if self.split_input else self.in_sizes[self.axis.rank]
        self.options = dict(input_layout=input_layout, output_layout=output_layout, use_local_output=use_local_output,
                            name=name)
        self.fast = (use_local_output and isinstance(output_layout or Replicate(), Replicate)
                     and (self.split_input or input_layout == Shard(-1)))

    def __call__(self, x, weight, bias):
        if self.fast and type(x) is torch.Tensor and x.shape[-1] == self.expected and not is_compiling():
            return _row(x, weight, bias, self.axis, self.in_sizes, self.split_input, None)
        return row_linear(x, weight, bias, **self.options)  # also the clear error for a wrong input width
