"""Tensor-parallel linear forwards.  `ColumnForward.__call__` and `RowForward.__call__` are the one place where a
layer's forward path is chosen; a layer's layout is fixed once, when it is built.

- Megatron's layouts run one fused autograd function each (dtp.ops.linear_autograd: local math plus exactly the
  collectives the layout needs, issued through dtp.runtime.collectives).  Column: X replicated (a plain tensor or a
  replicated DTensor, read in place) or sequence-sharded in, Y feature-sharded or gathered out.  Row: X
  feature-sharded or whole in, Y all-reduced or reduce-scattered out.
- Any other layout (a batch-sharded or Partial input, a Column output sharded on the sequence, ...) takes torch's
  DTensor semantics (dtp.ops.dtensor_forward), as torch's styles do.
- Under torch.compile each runs its traced twin (dtp.runtime.traced.traced_as): DTensor's ops, same math.

`column_linear` / `row_linear` are the functional face: the same forwards for the layout of the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from dtp.ops.dtensor_forward import as_local, dtensor_forward, is_last_dim, wrap_output
from dtp.ops.linear_autograd import ColumnLinearFn, RowLinearFn
from dtp.runtime.apply import direct_apply
from dtp.runtime.collectives import axis_of, chunk_sizes
from dtp.runtime.conversions import partial_spec
from dtp.runtime.local_shards import Speculation, is_guessed
from dtp.runtime.sharding import laid_out
from dtp.runtime.traced import traced_as

__all__ = ["ColumnForward", "RowForward", "column_linear", "row_linear"]

_REPLICATE = (Replicate(),)
_column = direct_apply(ColumnLinearFn)
_row = direct_apply(RowLinearFn)


def _width_error(name: str, got: int, expected: int, in_features: int, what: str) -> ValueError:
    return ValueError(f"{name}: input last dim is {got} but {what} must have {expected} features "
                      f"(in_features={in_features})")


def _check_input(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor or DTensor, got {type(x).__name__}")


_NO_BIAS = object()  # the bias "spec" of a layer without one


class _ParamLayout:
    """Whether a call's weight and bias are DTensors in the layout the fused functions read through their local tensors
    (the layer's own parameters are; a `functional_call` may pass others): checked in full once per spec object."""

    __slots__ = ("weight", "bias", "seen")

    def __init__(self, weight: Placement, bias: Placement):
        self.weight, self.bias, self.seen = weight, bias, (None, None)

    def holds(self, weight, bias) -> bool:
        spec, bias_spec = getattr(weight, "_spec", None), _NO_BIAS if bias is None else getattr(bias, "_spec", None)
        seen = self.seen
        if spec is seen[0] and bias_spec is seen[1] and spec is not None:
            return True
        ok = laid_out(weight, self.weight) and (bias is None or laid_out(bias, self.bias))
        if ok:
            self.seen = (spec, bias_spec)
        return ok


def _declared(x, layout: Placement) -> Placement:
    """x's actual placement if it is a DTensor, else the layout declared for a plain tensor."""
    return x.placements[-1] if isinstance(x, DTensor) else layout


def _traced_column(x, weight, bias, input_layout, output_layout, use_local_output, name, mesh=None):
    _check_input(x, name)
    if x.shape[-1] != weight.shape[1]:
        raise _width_error(name, x.shape[-1], weight.shape[1], weight.shape[1], "the full input")
    return dtensor_forward(lambda t: F.linear(t, weight, bias), x, weight.device_mesh if mesh is None else mesh,
                           _declared(x, input_layout), Replicate(), output_layout, use_local_output, where=name)


class ColumnForward:
    """Y = X Wᵀ + b, W Shard(0); forward all-gather of Y if the output is Replicate (and of X if sequence-sharded),
    backward all-reduce of dX (reduce-scatter if sequence-sharded; a replicated DTensor X gets a Partial dX that X's
    owner reduces once for all its readers)."""

    def __init__(self, mesh: DeviceMesh, in_features: int, out_features: int, *, input_layout: Placement | None,
                 output_layout: Placement | None, use_local_output: bool, name: str = "ColumnParallelLinear"):
        self.axis = axis_of(mesh)
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.input_layout = input_layout or Replicate()
        self.output_layout = output_layout or Shard(-1)
        self.gather = isinstance(self.output_layout, Replicate)
        self.out_sizes = chunk_sizes(out_features, self.axis.size) if self.gather else None
        self.use_local_output = use_local_output
        self.fast = (use_local_output and isinstance(self.input_layout, Replicate)
                     and (self.gather or self.output_layout == Shard(-1)))
        self._seen = (None, None)  # the last replicated input's spec and its Partial twin (dX's spec)
        self._params = _ParamLayout(Shard(0), Shard(0))
        self._speculation = {}  # input dim -> the sizes a plain sequence shard had last (dtp.runtime.local_shards)

    @traced_as(lambda self, x, weight, bias: _traced_column(x, weight, bias, self.input_layout, self.output_layout,
                                                            self.use_local_output, self.name))
    def __call__(self, x, weight, bias):
        if not self._params.holds(weight, bias):  # parameters in another layout (or plain): torch's semantics
            return _traced_column(x, weight, bias, self.input_layout, self.output_layout, self.use_local_output,
                                  self.name, self.axis.mesh)
        if self.fast and x.shape[-1] == self.in_features:  # the hot path: layout known, nothing to check
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
        _check_input(x, self.name)
        if x.shape[-1] != self.in_features:
            raise _width_error(self.name, x.shape[-1], self.in_features, self.in_features, "the full input")
        ndim, declared, out = x.dim(), _declared(x, self.input_layout), self.output_layout
        fused = ((isinstance(declared, Replicate) or (isinstance(declared, Shard) and not is_last_dim(declared, ndim)))
                 and (self.gather or is_last_dim(out, ndim)) and (not isinstance(x, DTensor) or x.device_mesh.ndim == 1))
        if not fused:  # torch's semantics through DTensor
            return dtensor_forward(lambda t: F.linear(t, weight, bias), x, weight.device_mesh, declared, Replicate(),
                                   out, self.use_local_output, where=self.name)
        in_dim = in_sizes = None
        if isinstance(x, DTensor) and isinstance(declared, Replicate):
            in_dim = partial_spec(x._spec)  # read in place; dX comes back Partial for X's owner to reduce
        else:
            guessed = is_guessed(x)
            x, placement, global_shape = as_local(x, self.name)
            if isinstance(placement if placement is not None else declared, Shard):  # sequence parallel
                in_dim = declared.dim % x.dim()
                if global_shape is None or guessed:  # a plain shard: the sizes ride in the all-gather
                    in_sizes = self._speculation.get(in_dim)
                    if in_sizes is None:
                        in_sizes = self._speculation[in_dim] = Speculation(self.name)
                else:
                    in_sizes = chunk_sizes(global_shape[in_dim], self.axis.size)
        y = ColumnLinearFn.apply(x, weight, bias, self.axis, in_dim, in_sizes, self.out_sizes)
        if self.use_local_output:
            return y
        return wrap_output(y, weight.device_mesh, Replicate() if self.gather else Shard(y.dim() - 1),
                           y.shape[:-1] + (self.out_features,))


def _traced_row(x, weight, bias, input_layout, output_layout, use_local_output, name, mesh=None):
    _check_input(x, name)
    ndim, declared = x.dim(), _declared(x, input_layout)
    shape = None if isinstance(x, DTensor) or not is_last_dim(declared, ndim) else x.shape[:-1] + (weight.shape[1],)
    return dtensor_forward(lambda t: F.linear(t, weight, bias), x, weight.device_mesh if mesh is None else mesh,
                           declared, Shard(ndim - 1), output_layout, use_local_output, global_shape=shape)


class RowForward:
    """Y = Σ_r X_r W_rᵀ + b, W Shard(1), b Replicate; forward all-reduce of Y (reduce-scatter for a Shard(d) output),
    backward none (all-gather of dX for a whole input, of dY for a scattered output); the bias added once."""

    def __init__(self, mesh: DeviceMesh, in_features: int, *, input_layout: Placement | None,
                 output_layout: Placement | None, use_local_output: bool, name: str = "RowParallelLinear"):
        self.axis = axis_of(mesh)
        self.in_features, self.name = in_features, name
        self.input_layout = input_layout or Shard(-1)
        self.output_layout = output_layout or Replicate()
        self.use_local_output = use_local_output
        self.in_sizes = chunk_sizes(in_features, self.axis.size)
        self.split_input = isinstance(self.input_layout, Replicate)
        self.expected = in_features if self.split_input else self.in_sizes[self.axis.rank]
        self.fast = (use_local_output and isinstance(self.output_layout, Replicate)
                     and (self.split_input or self.input_layout == Shard(-1)))
        self._params = _ParamLayout(Shard(1), Replicate())

    @traced_as(lambda self, x, weight, bias: _traced_row(x, weight, bias, self.input_layout, self.output_layout,
                                                         self.use_local_output, self.name))
    def __call__(self, x, weight, bias):
        if not self._params.holds(weight, bias):  # parameters in another layout (or plain): torch's semantics
            return _traced_row(x, weight, bias, self.input_layout, self.output_layout, self.use_local_output,
                               self.name, self.axis.mesh)
        if self.fast and type(x) is torch.Tensor and x.shape[-1] == self.expected:  # the hot path
            return _row(x, weight, bias, self.axis, self.in_sizes, self.split_input, None)
        _check_input(x, self.name)
        ndim, declared, out = x.dim(), _declared(x, self.input_layout), self.output_layout
        if not ((isinstance(declared, Replicate) or is_last_dim(declared, ndim)) and isinstance(out, (Replicate, Shard))
                and (not isinstance(x, DTensor) or x.device_mesh.ndim == 1)):  # torch's semantics through DTensor
            if isinstance(x, DTensor) and x.shape[-1] != self.in_features:
                raise _width_error(self.name, x.shape[-1], self.in_features, self.in_features, "the full (global) input")
            return dtensor_forward(lambda t: F.linear(t, weight, bias), x, weight.device_mesh, declared,
                                   Shard(ndim - 1), out, self.use_local_output, where=self.name)
        x, _, _ = as_local(x, self.name)
        split_input, axis = isinstance(declared, Replicate), self.axis
        expected = self.in_features if split_input else self.in_sizes[axis.rank]
        if x.shape[-1] != expected:
            what = "the full input" if split_input else f"this rank's slice of the input (rank {axis.rank} of {axis.size})"
            raise _width_error(self.name, x.shape[-1], expected, self.in_features, what)
        out_dim = out.dim % x.dim() if isinstance(out, Shard) else None
        y = RowLinearFn.apply(x, weight, bias, axis, self.in_sizes, split_input, out_dim)
        if self.use_local_output:
            return y
        shape = list(y.shape)
        if out_dim is not None:
            shape[out_dim] = x.shape[out_dim] if out_dim != x.dim() - 1 else weight.shape[0]
        return wrap_output(y, weight.device_mesh, Shard(out_dim) if out_dim is not None else Replicate(), shape)


_FORWARDS: dict = {}  # (kind, id(mesh), shape, layout options) -> (mesh, forward): a call's layout, built once


def _forward_for(kind: type, weight: DTensor, **options):
    mesh = weight.device_mesh
    key = (kind, id(mesh), tuple(weight.shape), tuple(sorted(options.items(), key=lambda kv: kv[0])))
    hit = _FORWARDS.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    if len(_FORWARDS) > 1024:
        _FORWARDS.clear()
    args = (weight.shape[1], weight.shape[0]) if kind is ColumnForward else (weight.shape[1],)
    forward = kind(mesh, *args, **options)
    _FORWARDS[key] = (mesh, forward)
    return forward


def _traced_column_linear(x, weight, bias=None, *, gather_output=True, input_layout=None, output_layout=None,
                          use_local_output=True, name="column_linear"):
    out = output_layout if output_layout is not None else (Replicate() if gather_output else Shard(-1))
    return _traced_column(x, weight, bias, input_layout or Replicate(), out, use_local_output, name)


@traced_as(_traced_column_linear)
def column_linear(x, weight: DTensor, bias: DTensor | None = None, *, gather_output: bool = True,
                  input_layout: Placement | None = None, output_layout: Placement | None = None,
                  use_local_output: bool = True, name: str = "column_linear"):
    """Y = X Wᵀ + b with W split by rows (Shard(0)); forward all-gather of Y if gather_output, backward all-reduce of dX.

    X is replicated (a plain tensor counts as `input_layout`, default Replicate) or, for sequence
    parallelism, sharded on a non-feature dim: then the forward all-gathers X and the backward
    reduce-scatters dX instead.  output_layout (default Replicate if gather_output, else Shard(-1))
    and input layouts beyond these go through DTensor.
    """
    out = output_layout if output_layout is not None else (Replicate() if gather_output else Shard(-1))
    return _forward_for(ColumnForward, weight, input_layout=input_layout, output_layout=out,
                        use_local_output=use_local_output, name=name)(x, weight, bias)


def _traced_row_linear(x, weight, bias=None, *, input_is_parallel=True, input_layout=None, output_layout=None,
                       use_local_output=True, name="row_linear"):
    declared = input_layout if input_layout is not None else (Shard(-1) if input_is_parallel else Replicate())
    return _traced_row(x, weight, bias, declared, output_layout or Replicate(), use_local_output, name)


@traced_as(_traced_row_linear)
def row_linear(x, weight: DTensor, bias: DTensor | None = None, *, input_is_parallel: bool = True,
               input_layout: Placement | None = None, output_layout: Placement | None = None,
               use_local_output: bool = True, name: str = "row_linear"):
    """Y = Σ_r X_r W_rᵀ + b with W split by columns (Shard(1)); forward all-reduce (Replicate) or reduce-scatter (Shard(d)) of Y.

    X is this rank's slice of the last dim (`input_is_parallel`, `input_layout=Shard(-1)` or such a
    DTensor) or the full input (Replicate), sliced locally (its gradient is then all-gathered in the
    backward).  The bias is added once, after the reduction.  Other input layouts go through DTensor.
    """
    declared = input_layout if input_layout is not None else (Shard(-1) if input_is_parallel else Replicate())
    return _forward_for(RowForward, weight, input_layout=declared, output_layout=output_layout,
                        use_local_output=use_local_output, name=name)(x, weight, bias)
