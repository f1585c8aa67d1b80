"""The layout a plan gave a module's own parameters, for the styles whose forward reads them as this rank's shards
(the experts): recorded when a plan call ends, checked by their forward, so that parameters in another layout
(a `torch.func.functional_call` with replicated ones, say) get a clear error instead of a wrong number."""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["record_own_layouts", "check_own_layout"]


def record_own_layouts(root: nn.Module) -> None:
    """For every module whose style reads its own shards (`style.reads_own_shards`): the placements of its own DTensor
    parameters as they are now, the end of a plan call (no communication)."""
    for module in root.modules():
        style = module.__dict__.get("_dtp_style")
        if getattr(style, "reads_own_shards", False):
            module._dtp_own_layout = {name: p._spec.placements for name, p in module._parameters.items()
                                      if isinstance(p, DTensor)}


def check_own_layout(module: nn.Module) -> None:
    """ValueError (the same on every rank) naming the module and the parameter when one of module's own parameters is not
    the DTensor layout its plan gave it; its forward reads them as this rank's shards (no communication)."""
    for name, placements in module.__dict__.get("_dtp_own_layout", {}).items():
        p = module._parameters.get(name)
        got = p._spec.placements if isinstance(p, DTensor) else None
        if got != placements:
            raise ValueError(
                f"{type(module._dtp_style).__name__}({module._dtp_path!r}): parameter {name!r} is "
                f"{'a plain tensor' if got is None else f'a DTensor {list(got)}'}, not the {list(placements)} DTensor "
                f"the plan made it; this module computes on each rank's shard of its own parameters, so it cannot run "
                f"on another layout (a functional_call must pass them as the plan laid them out)")
