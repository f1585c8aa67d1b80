"""PrepareModuleInput / PrepareModuleOutput at run time: declare layouts, redistribute, check DTensors match."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Placement, Shard

from .views import from_local, to_local

__all__ = ["prepare_inputs", "prepare_outputs"]


def _same(a: Placement, b: Placement, ndim: int) -> bool:
    if isinstance(a, Shard) and isinstance(b, Shard):
        return a.dim % ndim == b.dim % ndim
    return a == b


def _prepare(value, mesh, declared: Placement | None, desired: Placement | None, use_local: bool, where: str):
    """value as a DTensor with the declared layout, redistributed to the desired one (torch's semantics)."""
    if declared is None:
        return value
    if isinstance(value, DTensor):
        if not _same(value.placements[-1], declared, value.dim()):
            raise ValueError(f"{where}: the input is declared {declared!r} but arrived as a DTensor with placements "
                             f"{list(map(repr, value.placements))} (global shape {tuple(value.shape)})")
        dt = value
    elif isinstance(value, torch.Tensor):
        shape = list(value.shape)
        if isinstance(declared, Shard):  # a plain local shard is taken as an even one, as torch does
            shape[declared.dim % value.dim()] *= mesh.size()
        dt = from_local(value, mesh, declared, shape)
    else:
        raise TypeError(f"{where}: a layout {declared} is declared for an input that is a {type(value).__name__}")
    if desired is not None and not _same(desired, declared, dt.dim()):
        dt = dt.redistribute(mesh, [desired])
    return to_local(dt) if use_local else dt


def prepare_inputs(module, args, kwargs):
    """Forward pre-hook of PrepareModuleInput: returns the redistributed (args, kwargs)."""
    style, mesh, where = module._dtp_style, module._dtp_mesh, f"PrepareModuleInput({module._dtp_path!r})"
    if style.input_layouts is not None:
        if len(args) != len(style.input_layouts):
            raise ValueError(f"{where}: the module got {len(args)} positional inputs but input_layouts has "
                             f"{len(style.input_layouts)}")
        args = tuple(_prepare(a, mesh, d, w, style.use_local_output, where)
                     for a, d, w in zip(args, style.input_layouts, style.desired_input_layouts))
    if style.input_kwarg_layouts:
        kwargs = {k: _prepare(v, mesh, style.input_kwarg_layouts.get(k), style.desired_input_kwarg_layouts.get(k),
                              style.use_local_output, where) for k, v in kwargs.items()}
    return args, kwargs


def prepare_outputs(module, outputs):
    """Forward hook of PrepareModuleOutput: returns the redistributed output(s)."""
    style, mesh, where = module._dtp_style, module._dtp_mesh, f"PrepareModuleOutput({module._dtp_path!r})"
    single = not isinstance(outputs, tuple)
    outs = (outputs,) if single else outputs
    if len(outs) != len(style.output_layouts):
        raise ValueError(f"{where}: the module returned {len(outs)} outputs but output_layouts has "
                         f"{len(style.output_layouts)}")
    outs = tuple(_prepare(o, mesh, d, w, style.use_local_output, where)
                 for o, d, w in zip(outs, style.output_layouts, style.desired_output_layouts))
    return outs[0] if single else outs
