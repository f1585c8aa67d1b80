"""Per-layer forwards with their layout decided once, at construction: the hot path.

A prepared forward caches the layer's collective group and shard sizes, and for the common case
(a plain tensor in, a plain tensor out) goes straight to the layer's autograd function; anything
else (DTensor inputs, DTensor outputs, sequence-sharded inputs) takes the general path in
`dtp.functional`, which decides the same things per call.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate

from .collectives import axis_of, chunk_sizes
from .functional import ColumnLinearFn, RowLinearFn, column_linear, row_linear

__all__ = ["ColumnForward", "RowForward"]


class ColumnForward:
    """column_linear with the layout fixed: Y = X Wᵀ + b, W Shard(0); all-gather of Y if gather_output."""

    def __init__(self, mesh: DeviceMesh, out_features: int, *, gather_output: bool,
                 input_layout: Placement | None, use_local_output: bool):
        self.axis = axis_of(mesh)
        self.out_sizes = chunk_sizes(out_features, self.axis.size) if gather_output else None
        self.options = dict(gather_output=gather_output, input_layout=input_layout, use_local_output=use_local_output)
        self.fast = use_local_output and isinstance(input_layout or Replicate(), Replicate)

    def __call__(self, x, weight, bias):
        if self.fast and type(x) is torch.Tensor:
            return ColumnLinearFn.apply(x, weight, bias, self.axis, None, None, self.out_sizes)
        return column_linear(x, weight, bias, **self.options)


class RowForward:
    """row_linear with the layout fixed: Y = Σ_r X_r W_rᵀ + b, W Shard(1); all-reduce (or reduce-scatter) of Y."""

    def __init__(self, mesh: DeviceMesh, in_features: int, *, input_is_parallel: bool,
                 output_layout: Placement | None, use_local_output: bool):
        self.axis = axis_of(mesh)
        self.in_sizes = chunk_sizes(in_features, self.axis.size)
        self.split_input = not input_is_parallel
        self.expected = in_features if self.split_input else self.in_sizes[self.axis.rank]
        self.options = dict(input_is_parallel=input_is_parallel, output_layout=output_layout,
                            use_local_output=use_local_output)
        self.fast = use_local_output and isinstance(output_layout or Replicate(), Replicate)

    def __call__(self, x, weight, bias):
        if self.fast and type(x) is torch.Tensor and x.shape[-1] == self.expected:
            return RowLinearFn.apply(x, weight, bias, self.axis, self.in_sizes, self.split_input, None)
        return row_linear(x, weight, bias, **self.options)  # also the clear error for a wrong input width

