"""parallelize_module(module, device_mesh, plan): apply styles to the modules a plan's path patterns name.

Plan values are dtp styles, torch.distributed.tensor.parallel style objects or Hugging Face plan
strings.  Patterns match module paths one dot-separated segment at a time with fnmatch (`*` never
crosses a dot); "" is the module itself; a Hugging Face string may also name a parameter.  Every
check runs on every rank before anything changes and before any collective: an entry that matches
nothing (a warning, as in torch and transformers; an error with strict=True), a path two entries match, a style on a
module it does not fit or that another style already split, a head that would be cut.  A plan may
be applied in several calls (root, then each block, or the other way round); applying the same
style to a module again changes nothing.
"""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dtp.plan.adapters import plan_for_adapters
from dtp.plan.heads import HEAD_ATTRIBUTES, check_whole_heads
from dtp.plan.plan_values import style_of
from dtp.plan.mistakes import check_fused_gate_up, check_head_indexed_rowwise, watch_uncovered_parameters
from dtp.plan.own_layout import record_own_layouts
from dtp.plan.hf_plans import ShardParameter, hf_parameter_placement
from dtp.plan.moe_styles import MlaKvAProjParallel
from dtp.mesh import tp_submesh
from dtp.runtime.sharding import broadcast_from
from dtp.replica_check import check_replicas
from dtp.plan.replicated import replicate_remaining_
from dtp.plan.style import ParallelStyle
from dtp.plan.styles import ColwiseParallel, RowwiseParallel
from dtp.plan.torch_styles import TorchStyle, is_torch_style
from dtp.plan.unit_styles import UnitColwiseParallel, UnitRowwiseParallel, resolve_unit_style

__all__ = ["parallelize_module", "explain_plan", "applied_styles"]


def _matches(pattern: str, path: str) -> bool:
    if pattern == "" or path == "":
        return pattern == path
    pat, parts = pattern.split("."), path.split(".")
    return len(pat) == len(parts) and all(fnmatchcase(p, q) for q, p in zip(pat, parts))


def _as_style(value, where: str) -> ParallelStyle:
    style = style_of(value, where)
    if style is not None:
        return style
    raise TypeError(f"{where}: expected a dtp style (dtp.ColwiseParallel(), ...), a torch.distributed.tensor.parallel "
                    f"style or a Hugging Face plan string, got {type(value).__module__}.{type(value).__name__}")


def _rope_dim(model: nn.Module, path: str):
    """qk_rope_head_dim for an MLA projection: its attention module's, else the model config's (as transformers)."""
    parent = model.get_submodule(path.rpartition(".")[0])
    if hasattr(parent, "qk_rope_head_dim"):
        return parent.qk_rope_head_dim
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "qk_rope_head_dim", None)


def _check_heads(model: nn.Module, path: str, style, target: nn.Module, tp: int, where: str) -> None:
    """A projection an attention module's heads run through must give each rank whole heads."""
    if (not path or not isinstance(target, nn.Linear) or not isinstance(style, (ColwiseParallel, RowwiseParallel))
            or isinstance(style, (UnitColwiseParallel, UnitRowwiseParallel))):  # heads shared by groups of ranks
        return
    parent_path = path.removesuffix(".base_layer").rpartition(".")[0]  # a peft LoRA layer's base: its attention
    parent = model.get_submodule(parent_path)
    if any(hasattr(parent, a) for a in HEAD_ATTRIBUTES + ("head_dim",)):
        features = target.out_features if isinstance(style, ColwiseParallel) else target.in_features
        for part in style.block_sizes(target, tp) if hasattr(style, "block_sizes") else (features,):  # packed: per block
            check_whole_heads(parent, parent_path, part, tp, where)
        check_head_indexed_rowwise(parent, parent_path, target, style, where)


def explain_plan(module: nn.Module, parallelize_plan, device_mesh: DeviceMesh | None = None, *,
                 strict: bool = False) -> dict:
    """{module or parameter path: style} the plan would apply, after every check parallelize_module makes (changes nothing)."""
    mesh = tp_submesh(device_mesh, "parallelize_module")
    if isinstance(parallelize_plan, ParallelStyle) or is_torch_style(parallelize_plan):
        parallelize_plan = {"": parallelize_plan}
    if not isinstance(parallelize_plan, dict):
        raise TypeError(f"parallelize_module: parallelize_plan must be a dict {{path pattern: style}} or a style, "
                        f"got {type(parallelize_plan).__name__}")
    parallelize_plan = plan_for_adapters(module, parallelize_plan)
    paths = [name for name, _ in module.named_modules()]
    params = dict(module.named_parameters())
    chosen: dict[str, tuple[str, object]] = {}
    for pattern, value in parallelize_plan.items():
        entry = f"plan entry {pattern!r}"
        hits = [p for p in paths if _matches(pattern, p)]
        param_hits = [] if hits else [p for p in params if _matches(pattern, p)]
        if not hits and not param_hits:
            _as_style(value, entry)  # still a value dtp understands
            message = f"{entry} matches no module; module paths include {', '.join(repr(p) for p in paths[1:8])}"
            if strict:
                raise ValueError(message)
            warnings.warn(message + "; the entry is skipped (strict=True makes this an error)", stacklevel=3)
            continue
        if param_hits and not isinstance(value, str):
            raise ValueError(f"{entry} names parameters ({param_hits[:3]}); styles apply to modules (only a Hugging "
                             f"Face plan string may name a parameter)")
        for path in hits + param_hits:
            where = f"{entry} at {'module' if hits else 'parameter'} {path!r}"
            if path in chosen:
                raise ValueError(f"module {path!r} is matched by two plan entries, {chosen[path][0]!r} and {pattern!r}")
            if param_hits:
                style = ShardParameter(hf_parameter_placement(value, path, params[path].dim(), where), value)
                style.check(params[path], mesh, where)
                owner_path, _, name = path.rpartition(".")
                check_fused_gate_up(module.get_submodule(owner_path), name, value, where)
            else:
                style = _as_style(value, where)
                target = module.get_submodule(path)
                if isinstance(style, MlaKvAProjParallel) and style.rope_dim is None:
                    style = MlaKvAProjParallel(rope_dim=_rope_dim(module, path))
                style = resolve_unit_style(style, module, module.get_submodule(path.rpartition(".")[0]), target,
                                           mesh.size(), where)
                style.check(target, mesh, where)
                _check_heads(module, path, style, target, mesh.size(), where)
            chosen[path] = (pattern, style)
    return {path: style for path, (_, style) in chosen.items()}


def parallelize_module(module: nn.Module, device_mesh: DeviceMesh | None = None, parallelize_plan=None, *,
                       src_data_rank: int | None = 0, replicate_rest: bool = True, strict: bool = False,
                       validate: bool = False) -> nn.Module:
    """Split module in place by a plan {path pattern: style} on the mesh's tp axis; one broadcast per parameter from mesh rank
    src_data_rank (as torch: every rank ends with that rank's values), or none with src_data_rank=None (local slices).

    With replicate_rest (the default) the parameters no style touched become replicated DTensors
    (their modules still compute on local tensors), so the whole model is DTensor parameters.  An entry
    that matches nothing warns and is skipped, as in torch; strict=True makes it an error.  Tied weights
    (one Parameter in two modules) stay tied where the plan splits both uses alike.  validate=True ends with
    dtp.check_replicas (one all_gather_object): worth it with src_data_rank=None, where ranks keep their own values.
    """
    mesh = tp_submesh(device_mesh, "parallelize_module")
    if src_data_rank is not None and not (isinstance(src_data_rank, int) and 0 <= src_data_rank < mesh.size()):
        raise ValueError(f"parallelize_module: src_data_rank must be None or a rank of the {mesh.size()}-rank tp mesh "
                         f"(0..{mesh.size() - 1}), got {src_data_rank!r}")
    if not parallelize_plan:
        warnings.warn("parallelize_module: the plan is empty, so this call does nothing", stacklevel=2)
        return module
    plan = explain_plan(module, parallelize_plan, mesh, strict=strict)
    todo = {path: style for path, style in plan.items()
            if isinstance(style, ShardParameter) or not style.is_applied(module.get_submodule(path), mesh)}
    tied = _tied_groups(module)
    if src_data_rank is not None:  # every tensor this call turns into a DTensor takes src's values
        touched = module.parameters() if replicate_rest else [
            p for path, style in todo.items()
            for p in ([module.get_parameter(path)] if isinstance(style, ShardParameter)
                      else module.get_submodule(path).parameters())]
        broadcast_from(list(touched), mesh, src_data_rank)
    for path, style in todo.items():
        if isinstance(style, ShardParameter):
            owner_path, _, name = path.rpartition(".")
            style.shard(module.get_submodule(owner_path), name, mesh, path)
            continue
        if isinstance(style, TorchStyle):
            style.style.src_data_rank = src_data_rank
        style.apply(module.get_submodule(path), mesh, path)
    if replicate_rest:
        replicate_remaining_(module, mesh)
    _retie(tied)
    record_own_layouts(module)
    watch_uncovered_parameters(module)
    if validate:
        check_replicas(module)
    return module


def _tied_groups(module: nn.Module) -> list:
    """[[(owner, name), ...]] for every parameter object that more than one module holds (tied weights)."""
    owners: dict[int, list] = {}
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((owner, name))
    return [group for group in owners.values() if len(group) > 1]


def _retie(groups: list) -> None:
    """Tied weights stay one parameter where every use is split alike; else a warning says they came apart."""
    for group in groups:
        params = [owner._parameters[name] for owner, name in group]
        first = params[0]
        if all(p is first for p in params):
            continue
        layouts = {(p.device_mesh, p.placements, tuple(p.shape)) if isinstance(p, DTensor) else None for p in params}
        if len(layouts) == 1 and None not in layouts:
            for owner, name in group:
                owner._parameters[name] = first
        else:
            where = ", ".join(f"{type(o).__name__}.{n}" for o, n in group)
            warnings.warn(f"parallelize_module: tied parameters ({where}) are split differently "
                          f"({[getattr(p, 'placements', 'plain') for p in params]}); they are no longer tied",
                          stacklevel=3)


def applied_styles(module: nn.Module) -> dict:
    """{module path: style} for every module a plan has parallelized (the report of a successful call)."""
    return {name: m._dtp_style for name, m in module.named_modules() if hasattr(m, "_dtp_style")}
