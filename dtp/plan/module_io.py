"""PrepareModuleInput / PrepareModuleOutput / PrepareModuleInputOutput: declare the layouts of a module's inputs or
outputs and redistribute them to the desired ones, with torch's semantics.

A plain tensor is taken as this rank's local part of the declared layout (a Shard's global size learnt
from every rank, dtp.runtime.local_shards: torch.chunk's uneven splits are exact, where torch assumes an
even one); a DTensor is taken as it is, whatever it was declared, and redistributed from its actual
layout to the desired one (a batch-sharded input is all-gathered, a Partial one reduced, ...).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from dtp.runtime.mappings import sequence_scatter, split_to
from dtp.runtime.collectives import all_gather, axis_of, chunk_offset, chunk_sizes, reduce_scatter
from dtp.runtime.grads import reducing_node, run_deferred
from dtp.runtime.local_shards import Speculation, is_guessed, plain_global_shape, speculation
from dtp.runtime.sharding import same_placement
from dtp.plan.style import ParallelStyle
from dtp.runtime.traced import traced_as
from dtp.runtime.conversions import from_local, from_local_spec, spec_of, to_local

__all__ = ["PrepareModuleInput", "PrepareModuleOutput", "PrepareModuleInputOutput", "prepare_value"]


class LayoutLengthError(ValueError, AssertionError):
    """Layouts of different lengths (torch raises AssertionError in the constructor, ValueError at run time)."""


def _as_tuple(v):
    return (v,) if isinstance(v, Placement) else (tuple(v) if v is not None else None)


@reducing_node
class _GatherSequence(torch.autograd.Function):
    """This rank's shard along dim -> the replicated DTensor: fwd one all-gather; bwd one reduce-scatter of a Partial
    gradient (the column layers' shares of dX), or this rank's slice of a replicated one."""

    @staticmethod
    def forward(ctx, local, dim, sizes, axis, spec):
        if isinstance(sizes, Speculation):  # a plain shard's: the sizes ride in the all-gather
            gathered, sizes = sizes.gather(local, dim, axis)
            shape = list(local.shape)
            shape[dim] = sum(sizes)
            spec = spec_of(axis.mesh, Replicate(), shape, local.dtype)
        else:
            gathered = all_gather(local, dim, sizes, axis).wait()
        ctx.layout = (dim, sizes, axis)
        return DTensor.__new__(DTensor, gathered, spec, requires_grad=False)

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        if torch.is_grad_enabled():  # create_graph: the same reduction, differentiable
            if isinstance(g, DTensor) and g.placements == (Partial(),):
                return sequence_scatter(to_local(g), dim, sizes, axis), None, None, None, None
            if isinstance(g, DTensor):
                g = to_local(g.redistribute(g.device_mesh, [Replicate()]))
            return split_to(g, dim, sizes, axis), None, None, None, None
        if isinstance(g, DTensor) and g.placements == (Partial(),):
            pending = reduce_scatter(g._local_tensor, dim, sizes, axis)
            run_deferred(g)  # the readers' weight gradients, while the reduce-scatter is in flight
            return pending.wait(), None, None, None, None
        if isinstance(g, DTensor) and g.placements != (Replicate(),):
            g = g.redistribute(g.device_mesh, [Replicate()])
        g = g._local_tensor if isinstance(g, DTensor) else g
        total = sum(sizes)
        return g.narrow(dim, chunk_offset(total, axis.size, axis.rank), sizes[axis.rank]), None, None, None, None


def _gather_sequence(value, mesh, dim: int, where: str):
    """The fused Shard(dim) -> Replicate of sequence parallelism (plain local shard or DTensor)."""
    local = to_local(value) if isinstance(value, DTensor) else value
    axis = axis_of(mesh)
    if not isinstance(value, DTensor) or is_guessed(value):  # every rank's length, not torch's even guess
        return _GatherSequence.apply(local, dim, speculation(where, dim), axis, None)
    total = value.shape[dim]
    shape = list(local.shape)
    shape[dim] = total
    return _GatherSequence.apply(local, dim, chunk_sizes(total, axis.size), axis, spec_of(mesh, Replicate(), shape,
                                                                                          local.dtype))


def _prepare_general(value, mesh, declared: Placement | None, desired: Placement | None, use_local: bool, where: str):
    """prepare_value through DTensor's redistribute (also its traced form: a plain shard is taken as an even one)."""
    if declared is None:
        return value
    if isinstance(value, DTensor):
        dt = value
    elif isinstance(value, torch.Tensor):
        if use_local and (desired is None or same_placement(declared, desired, value.dim())):
            return value  # stays this rank's local tensor: no global shape needed
        dt = from_local(value, mesh, declared, plain_global_shape(value, mesh, declared, where))
    else:
        raise TypeError(f"{where}: a layout {declared} is declared for an input that is a {type(value).__name__}")
    if desired is not None and not same_placement(dt.placements[-1], desired, dt.dim()):
        dt = dt.redistribute(mesh, [desired])
    return to_local(dt) if use_local else dt


@traced_as(_prepare_general)
def prepare_value(value, mesh, declared: Placement | None, desired: Placement | None, use_local: bool, where: str):
    """value as a DTensor (declared layout if plain), redistributed to `desired`; its local tensor if use_local."""
    if declared is not None and isinstance(value, torch.Tensor) and mesh.ndim == 1 and isinstance(desired, Replicate):
        actual = value.placements[-1] if isinstance(value, DTensor) and value.device_mesh.ndim == 1 else declared
        if isinstance(actual, Shard) and (not isinstance(value, DTensor) or value.device_mesh == mesh):
            dt = _gather_sequence(value, mesh, actual.dim % value.dim(), where)  # SP's fused Shard -> Replicate
            return to_local(dt) if use_local else dt
    if isinstance(value, DTensor) and declared is not None and is_guessed(value):  # ask every rank its length
        declared, value = value.placements[0], to_local(value)
    return _prepare_general(value, mesh, declared, desired, use_local, where)


def _prepare_all(values, declared, desired, mesh, use_local, where, what, kind):
    if len(values) != len(declared):
        raise ValueError(f"{where}: module {what} and {kind}_layouts should have same length! The module got "
                         f"{len(values)} {what} but the style declares {len(declared)} layouts ({declared})")
    return tuple(prepare_value(v, mesh, d, w, use_local, where) for v, d, w in zip(values, declared, desired))


class PrepareModuleInput(ParallelStyle):
    """Declare the layouts of a module's inputs and redistribute them to the desired ones (DTensor's collectives)."""

    def __init__(self, *, input_layouts=None, desired_input_layouts=None, input_kwarg_layouts=None,
                 desired_input_kwarg_layouts=None, use_local_output: bool = False):
        self.input_layouts = _as_tuple(input_layouts)
        self.desired_input_layouts = _as_tuple(desired_input_layouts)
        self.input_kwarg_layouts = dict(input_kwarg_layouts or {})
        self.desired_input_kwarg_layouts = dict(desired_input_kwarg_layouts or {})
        self.use_local_output = use_local_output
        if (self.input_layouts is None) != (self.desired_input_layouts is None) or (
                self.input_layouts is not None and len(self.input_layouts) != len(self.desired_input_layouts)):
            raise LayoutLengthError(f"PrepareModuleInput: input_layouts and desired_input_layouts should have same "
                                    f"length! Got {self.input_layouts} and {self.desired_input_layouts}")
        if set(self.input_kwarg_layouts) != set(self.desired_input_kwarg_layouts):
            raise ValueError("PrepareModuleInput: input_kwarg_layouts and desired_input_kwarg_layouts must name "
                             "the same keyword arguments")
        # the usual case (a transformer block's attention / MLP): plain tensors declared and wanted replicated, the
        # other inputs passed as they are; per input True (made a replicated DTensor) or False (passed through)
        self._replicated = None
        if (self.input_layouts is not None and not self.input_kwarg_layouts and not use_local_output
                and Replicate() in self.input_layouts
                and all((d is None and w is None) or (isinstance(d, Replicate) and (w is None or isinstance(w, Replicate)))
                        for d, w in zip(self.input_layouts, self.desired_input_layouts))):
            self._replicated = tuple(d is not None for d in self.input_layouts)
        self._spec = (None, None, None, None)  # the last replicated input's (mesh, shape, dtype, DTensor spec)

    @traced_as(lambda self, module, args: None)  # traced: the general path (DTensor's from_local)
    def _fast(self, module, args):
        """args with each declared-replicated plain tensor a replicated DTensor over it (no collective), or None where
        an input is not a plain tensor (the general path then decides)."""
        mesh, out = module._dtp_mesh, []
        for value, replicate in zip(args, self._replicated):
            if replicate:
                if type(value) is not torch.Tensor:
                    return None
                last_mesh, shape, dtype, spec = self._spec
                if last_mesh is not mesh or shape != value.shape or dtype != value.dtype:
                    spec = spec_of(mesh, Replicate(), value.shape, value.dtype)
                    self._spec = (mesh, value.shape, value.dtype, spec)
                value = from_local_spec(value, spec)
            out.append(value)
        return tuple(out)

    def prepare(self, module, args, kwargs):
        """The forward pre-hook: the redistributed (args, kwargs)."""
        if self._replicated is not None and len(args) == len(self._replicated):
            fast = self._fast(module, args)
            if fast is not None:
                return fast, kwargs
        mesh, where = module._dtp_mesh, f"PrepareModuleInput({module._dtp_path!r})"
        if self.input_layouts is not None:
            args = _prepare_all(args, self.input_layouts, self.desired_input_layouts, mesh, self.use_local_output,
                                where, "inputs", "input")
        if self.input_kwarg_layouts:
            kwargs = {k: prepare_value(v, mesh, self.input_kwarg_layouts.get(k), self.desired_input_kwarg_layouts.get(k),
                                       self.use_local_output, where) for k, v in kwargs.items()}
        return args, kwargs

    def _apply(self, module, mesh) -> None:
        module.register_forward_pre_hook(lambda mod, args, kwargs: self.prepare(mod, args, kwargs), with_kwargs=True)


class PrepareModuleOutput(ParallelStyle):
    """Declare the layouts of a module's outputs and redistribute them to the desired ones (DTensor's collectives)."""

    def __init__(self, *, output_layouts, desired_output_layouts, use_local_output: bool = True):
        self.output_layouts = _as_tuple(output_layouts)
        self.desired_output_layouts = _as_tuple(desired_output_layouts)
        self.use_local_output = use_local_output
        if len(self.output_layouts) != len(self.desired_output_layouts):
            raise LayoutLengthError(f"PrepareModuleOutput: output_layouts and desired_output_layouts should have "
                                    f"same length! Got {self.output_layouts} and {self.desired_output_layouts}")

    def prepare(self, module, outputs):
        """The forward hook: the redistributed output(s)."""
        where = f"PrepareModuleOutput({module._dtp_path!r})"
        single = not isinstance(outputs, tuple)
        outs = _prepare_all((outputs,) if single else outputs, self.output_layouts, self.desired_output_layouts,
                            module._dtp_mesh, self.use_local_output, where, "outputs", "output")
        return outs[0] if single else outs

    def _apply(self, module, mesh) -> None:
        module.register_forward_hook(lambda mod, args, out: self.prepare(mod, out))


class PrepareModuleInputOutput(ParallelStyle):
    """PrepareModuleInput and PrepareModuleOutput on one module (torch's names: use_local_input, use_local_output)."""

    def __init__(self, *, input_layouts=None, desired_input_layouts=None, input_kwarg_layouts=None,
                 desired_input_kwarg_layouts=None, use_local_input: bool = False, output_layouts,
                 desired_output_layouts, use_local_output: bool = True):
        self.prepare_module_input = PrepareModuleInput(
            input_layouts=input_layouts, desired_input_layouts=desired_input_layouts,
            input_kwarg_layouts=input_kwarg_layouts, desired_input_kwarg_layouts=desired_input_kwarg_layouts,
            use_local_output=use_local_input)
        self.prepare_module_output = PrepareModuleOutput(
            output_layouts=output_layouts, desired_output_layouts=desired_output_layouts,
            use_local_output=use_local_output)

    def _apply(self, module, mesh) -> None:
        self.prepare_module_input._apply(module, mesh)
        self.prepare_module_output._apply(module, mesh)

