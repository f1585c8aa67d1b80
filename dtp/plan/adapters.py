"""Adapters (peft LoRA) under a plan: the base model's own plan applied to a peft model.

`plan_for_adapters(module, plan)` rewrites a plan written for the bare model into one for the module as it
stands (a peft model, or a model with adapter layers), before any check runs:

- keys may be written as for the bare model or with peft's prefix (`base_model.model.` in a PeftModel,
  `model.` in a LoraModel): both name the same module;
- an entry that reaches a peft LoRA layer (a module wrapping `.base_layer`) is moved onto its parts as
  dtp.plan.lora_styles says (the base layer takes the entry; lora_A / lora_B the split that composes with it);
  one that reaches a `modules_to_save` wrapper applies to the original and to each trainable copy alike.

peft applied after dtp is refused where it happens, on every rank and before any collective (a module-registration
hook, installed by the first plan): peft would wrap split layers with whole or rank-local adapters, silently wrong.
peft is recognised by duck typing and never imported.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import register_module_module_registration_hook

from dtp.plan.lora_styles import has_class, is_adapter_layer, join, lora_entries
from dtp.plan.module_io import PrepareModuleInput, PrepareModuleInputOutput, PrepareModuleOutput
from dtp.plan.moe_styles import MlaKvAProjParallel, MoeIdentityParallel
from dtp.plan.plan_values import style_of

__all__ = ["plan_for_adapters", "bare_model_prefix"]

# styles that act on a module's inputs / outputs only: on an adapter layer they act on its sum, as on the base layer's
_ON_THE_WHOLE_LAYER = (PrepareModuleInput, PrepareModuleOutput, PrepareModuleInputOutput, MlaKvAProjParallel,
                       MoeIdentityParallel)
_hook = None


def bare_model_prefix(module: nn.Module) -> str:
    """Where the bare model sits in module: "base_model.model." in a peft PeftModel, "model." in a peft tuner model
    (LoraModel), "base_model." in a prompt-learning PeftModel, else "" (no collective)."""
    if has_class(module, "PeftModel") and isinstance(module._modules.get("base_model"), nn.Module):
        return "base_model.model." if has_class(module.base_model, "BaseTuner") else "base_model."
    if has_class(module, "BaseTuner") and isinstance(module._modules.get("model"), nn.Module):
        return "model."
    return ""


def _matches(pattern: str, path: str) -> bool:  # as dtp.plan.parallelize: one fnmatch per dot-separated segment
    if pattern == "" or path == "":
        return pattern == path
    pat, parts = pattern.split("."), path.split(".")
    return len(pat) == len(parts) and all(fnmatchcase(p, q) for q, p in zip(pat, parts))


def _prefixed(key: str, prefix: str, names: list) -> str:
    """key as written for the bare model at prefix, unless only the key as it stands names something."""
    new = prefix + key if key else prefix[:-1]
    if any(_matches(new, n) for n in names) or not any(_matches(key, n) for n in names):
        return new
    return key


def _style(value, where: str):
    """The dtp style a plan value stands for, or None for a value explain_plan will refuse itself."""
    return style_of(value, where)


def _is_saved_copies(module: nn.Module) -> bool:
    """peft's modules_to_save wrapper: the original module and a trainable copy per adapter."""
    return (isinstance(module._modules.get("original_module"), nn.Module)
            and isinstance(module._modules.get("modules_to_save"), nn.ModuleDict))


def _entries_at(path: str, target: nn.Module, value, where: str) -> dict:
    """{path: value} for the plan entry `value` reaching `target` at path, moved onto its parts if it is a wrapper."""
    style = _style(value, where)
    if style is None or isinstance(style, _ON_THE_WHOLE_LAYER):
        return {path: value}
    if _is_saved_copies(target):
        return {join(path, "original_module"): value,
                **{join(path, f"modules_to_save.{name}"): value for name in target.modules_to_save.keys()}}
    return lora_entries(path, target, style, where)


def _moved(module: nn.Module, pattern: str, value, hits: list, wrappers: set) -> dict:
    """The entries replacing `pattern` whose hits include adapter layers: the pattern itself with each part's suffix
    where every hit splits alike (a plan stays as short as it was), else one entry per path."""
    per_hit = []
    for path in hits:
        where = f"plan entry {pattern!r} at module {path!r}"
        entries = _entries_at(path, module.get_submodule(path), value, where) if path in wrappers else {path: value}
        per_hit.append([(key[len(path):], entry) for key, entry in entries.items()])
    if all(parts == per_hit[0] for parts in per_hit) and not any(c in "*?[" for s, _ in per_hit[0] for c in s):
        return {pattern + suffix: entry for suffix, entry in per_hit[0]}
    return {path + suffix: entry for path, parts in zip(hits, per_hit) for suffix, entry in parts}


def plan_for_adapters(module: nn.Module, plan: dict) -> dict:
    """The plan for module as it stands: keys prefixed to the bare model inside a peft model, entries on adapter layers
    moved onto their parts; for a module with no adapters, plan itself (no collective)."""
    _install_refusal()
    prefix = bare_model_prefix(module)
    if prefix:
        keyed, names = {}, [n for n, _ in module.named_modules()] + [n for n, _ in module.named_parameters()]
        for key, value in plan.items():
            new = _prefixed(key, prefix, names)
            if new in keyed:
                raise ValueError(f"plan entries {keyed[new][0]!r} and {key!r} both name {new!r} (a peft model's "
                                 f"keys may be written with or without {prefix!r}, not both)")
            keyed[new] = (key, value)
        plan = {new: value for new, (_, value) in keyed.items()}
    wrappers = {path for path, m in module.named_modules() if is_adapter_layer(m) or _is_saved_copies(m)}
    if not wrappers:
        return plan
    paths = [path for path, _ in module.named_modules()]
    out, origin = {}, {}
    for pattern, value in plan.items():
        hits = [p for p in paths if _matches(pattern, p)]
        moved = any(p in wrappers for p in hits)
        entries = _moved(module, pattern, value, hits, wrappers) if moved else {pattern: value}
        for key, entry in entries.items():
            if key in out:
                raise ValueError(f"module {key!r} is matched by two plan entries, {origin[key]!r} and {pattern!r}")
            out[key], origin[key] = entry, pattern
    return out


def _split_by_dtp(module: nn.Module) -> bool:
    return hasattr(module, "_dtp_style") or any(isinstance(p, DTensor) for p in module.parameters())


def _refuse_after_split(parent: nn.Module, name: str, child) -> None:
    """Module-registration hook: peft wrapping a layer dtp has split, or an adapter added to a split LoRA layer."""
    if child is None:
        return
    if name == "base_layer" and has_class(parent, "BaseTunerLayer") and _split_by_dtp(child):
        what = repr(child.__dict__.get("_dtp_path", type(child).__name__))
        style = child.__dict__.get("_dtp_style")
        split = f"split it ({style!r})" if style is not None else "made its parameters DTensors"
        raise ValueError(f"peft is wrapping {what} in a {type(parent).__name__} adapter layer, but "
                         f"dtp.parallelize_module has already {split}: its adapter would be whole or rank-local, "
                         f"silently wrong. Apply peft first, then dtp: peft_model = get_peft_model(model, config); "
                         f"dtp.parallelize_module(peft_model, mesh, model.tp_plan)")
    owner = parent.__dict__.get("_dtp_adapters_of")
    if owner is not None:
        raise ValueError(f"adapter {name!r} is being added to the LoRA layer {owner!r} after dtp.parallelize_module "
                         f"split it: it would not be split with the layer. Add every adapter (add_adapter, "
                         f"load_adapter) before dtp.parallelize_module")


def _install_refusal() -> None:
    global _hook
    if _hook is None:
        _hook = register_module_module_registration_hook(_refuse_after_split)
