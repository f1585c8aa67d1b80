"""parallelize_module(module, device_mesh, plan): apply styles to the modules a plan's path patterns name.

Patterns match module paths one dot-separated segment at a time with fnmatch (`*` never crosses
a dot); "" is the module itself.  Everything is checked on every rank before anything changes
(and no collective runs): an entry that matches nothing, a path two entries match, a style on a
module it does not fit, attention heads that do not divide by the tp size.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from .mesh import tp_submesh
from .replicate import replicate_remaining_
from .styles import ColwiseParallel, ParallelStyle, RowwiseParallel

__all__ = ["parallelize_module", "explain_plan", "applied_styles"]

HEAD_ATTRIBUTES = ("n_heads", "num_heads", "n_head", "num_attention_heads", "n_kv_heads", "num_key_value_heads")


def _matches(pattern: str, path: str) -> bool:
    if pattern == "" or path == "":
        return pattern == path
    pat, parts = pattern.split("."), path.split(".")
    return len(pat) == len(parts) and all(fnmatchcase(p, q) for q, p in zip(pat, parts))


def _check_heads(model: nn.Module, path: str, tp: int, where: str) -> None:
    """A split attention projection needs its parent's head counts divisible by the tp size."""
    parent = model.get_submodule(path.rpartition(".")[0])
    for attr in HEAD_ATTRIBUTES:
        heads = getattr(parent, attr, None)
        if isinstance(heads, int) and not isinstance(heads, bool) and heads % tp:
            raise ValueError(f"{where}: the attention module {path.rpartition('.')[0] or '<root>'!r} has "
                             f"{attr}={heads}, which is not divisible by the tp size {tp}; each rank must hold "
                             f"whole heads")


def explain_plan(module: nn.Module, parallelize_plan, device_mesh: DeviceMesh | None = None) -> dict:
    """{module path: style} the plan would apply, after every check parallelize_module makes (changes nothing)."""
    mesh = tp_submesh(device_mesh, "parallelize_module")
    if isinstance(parallelize_plan, ParallelStyle):
        parallelize_plan = {"": parallelize_plan}
    if not isinstance(parallelize_plan, dict):
        raise TypeError(f"parallelize_module: parallelize_plan must be a dict {{path pattern: style}} or a style, "
                        f"got {type(parallelize_plan).__name__}")
    paths = [name for name, _ in module.named_modules()]
    chosen: dict[str, tuple[str, ParallelStyle]] = {}
    for pattern, style in parallelize_plan.items():
        if not isinstance(style, ParallelStyle):
            raise TypeError(f"plan entry {pattern!r}: expected a dtp style (dtp.ColwiseParallel(), ...), got "
                            f"{type(style).__module__}.{type(style).__name__}")
        hits = [p for p in paths if _matches(pattern, p)]
        if not hits:
            sample = ", ".join(repr(p) for p in paths[1:8])
            raise ValueError(f"plan entry {pattern!r} matches no module; module paths include {sample}")
        for path in hits:
            if path in chosen:
                raise ValueError(f"module {path!r} is matched by two plan entries, {chosen[path][0]!r} and {pattern!r}")
            where = f"plan entry {pattern!r} at module {path!r}"
            target = module.get_submodule(path)
            style.check(target, mesh, where)
            if path and isinstance(style, (ColwiseParallel, RowwiseParallel)) and isinstance(target, nn.Linear):
                _check_heads(module, path, mesh.size(), where)
            chosen[path] = (pattern, style)
    return {path: style for path, (_, style) in chosen.items()}


def parallelize_module(module: nn.Module, device_mesh: DeviceMesh | None = None, parallelize_plan=None, *,
                       replicate_rest: bool = True) -> nn.Module:
    """Split module in place by a plan {path pattern: style} on the mesh's tp axis; each rank keeps its slice of the weights (no collective).

    With replicate_rest (the default) the parameters no style touched become replicated DTensors
    (their modules still compute on local tensors), so the whole model is DTensor parameters.
    """
    mesh = tp_submesh(device_mesh, "parallelize_module")
    for path, style in explain_plan(module, parallelize_plan or {}, mesh).items():
        style.apply(module.get_submodule(path), mesh, path)
    if replicate_rest:
        replicate_remaining_(module, mesh)
    return module


def applied_styles(module: nn.Module) -> dict:
    """{module path: style} for every module a plan has parallelized (the report of a successful call)."""
    return {name: m._dtp_style for name, m in module.named_modules() if hasattr(m, "_dtp_style")}
