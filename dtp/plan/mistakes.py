"""Mistakes in a model's own plan, named by module (dtp.PlanMistake), never a shape error mid-forward or a silent
gradient difference.

* A rowwise entry whose output is indexed by heads (`dt_proj: rowwise` in Doge: out_features = the attention
  module's head count) gives every rank all heads' values while the attention's heads are split: found at plan time.
* A plain `colwise` entry on a fused [gate; up] parameter (`experts.gate_up_proj: colwise` in Inkling) whose owner's
  class takes gate and up as its two halves (`.chunk(2, dim=-1)`): a contiguous split gives one rank gate rows only
  and another up rows only (`packed_colwise` splits each half over the ranks): found at plan time.
* A trainable parameter no entry covers, read on sharded activations (Apertus' `act_fn.alpha_p` between a colwise
  and a rowwise projection): its gradient would be only this rank's share.  Whether an input is sharded is known only
  from the data, so a one-shot hook checks the first forward in grad mode (the hook then removes itself) and raises
  before the module computes, on every rank alike.
"""

from __future__ import annotations

import inspect
import re
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from dtp.plan.heads import HEAD_ATTRIBUTES
from dtp.runtime.traced import traced_as

__all__ = ["PlanMistake", "check_head_indexed_rowwise", "check_fused_gate_up", "watch_uncovered_parameters"]

SEARCH_DEPTH = 8  # autograd nodes walked back from a module's input (past elementwise and shape ops)


class PlanMistake(UserWarning, ValueError):
    """A plan that would give wrong numbers or fail mid-forward (a ValueError, raised on every rank)."""


def _attribute(owner, name):
    """owner.name, or None where reading it raises (a per-layer config attribute read globally, say)."""
    try:
        return getattr(owner, name, None)
    except Exception:  # noqa: BLE001 - transformers' heterogeneous configs raise on a global read
        return None


def check_head_indexed_rowwise(attention: nn.Module, attention_path: str, target: nn.Linear, style, where: str):
    """PlanMistake for a rowwise Linear with a replicated output of one value per head of a head-split attention."""
    from dtp.plan.styles import RowwiseParallel

    if not isinstance(style, RowwiseParallel) or not isinstance(style.output_layouts, Replicate):
        return
    config = getattr(attention, "config", None)
    counts = {a: n for owner in (config, attention) for a in HEAD_ATTRIBUTES
              if isinstance(n := _attribute(owner, a), int) and not isinstance(n, bool)}
    hit = [a for a, n in counts.items() if n == target.out_features]
    widths = {m.in_features for m in attention.children() if isinstance(m, nn.Linear)}
    if hit and target.out_features not in widths:  # not a projection back onto the model's width (an o_proj)
        raise PlanMistake(
            f"{where}: the model's plan makes this projection rowwise, but its {target.out_features} outputs are one per "
            f"head ({hit[0]}={target.out_features} of {attention_path!r}), whose heads the plan splits over tp: every "
            f"rank would get all heads' values for its own heads (a shape error mid-forward). Split its output by "
            f"heads instead: dtp.RowwiseParallel(output_layouts=dtp.Shard(-1)) (a reduce-scatter)")


def check_fused_gate_up(owner: nn.Module, name: str, source: str, where: str) -> None:
    """PlanMistake for plain `colwise` on a fused gate_up parameter that owner's forward splits into two halves."""
    if source != "colwise" or "gate_up" not in name:
        return
    code = ""
    for cls in type(owner).__mro__:  # its forward and the helpers it calls, its own bases' included
        if cls.__module__.startswith("torch."):
            break
        try:
            code += inspect.getsource(cls)
        except (OSError, TypeError):
            continue
    if re.search(r"\.chunk\(\s*2\b", code) and "::2" not in code:  # halves, not interleaved (gate, up) pairs
        raise PlanMistake(
            f"{where}: the model's plan makes this fused [gate; up] parameter 'colwise', a contiguous split over tp, but "
            f"{type(owner).__name__} takes gate and up as its two halves (.chunk(2)): one rank would hold "
            f"gate rows only and another up rows only (wrong numbers, silently). Use 'packed_colwise', which splits "
            f"each half over the ranks")


def _sharded_producer(node) -> str | None:
    """'ColumnLinearFn' if this autograd node is a dtp layer whose output is a local shard, else None."""
    cls = getattr(node, "_forward_cls", None)
    if cls is None or not cls.__module__.startswith("dtp."):
        return None
    layout = getattr(node, "layout", None)
    if cls.__name__ == "ColumnLinearFn" and layout is not None and layout[3] is None:
        return "a column-parallel layer's local output"
    return None


def _reads_sharded(values) -> str | None:
    """What sharded dtp output any tensor in values derives from (a few autograd nodes back), else None."""
    todo = [(getattr(v, "grad_fn", None), 0) for v in values]
    seen = set()
    while todo:
        node, depth = todo.pop()
        if node is None or id(node) in seen or depth > SEARCH_DEPTH:
            continue
        seen.add(id(node))
        found = _sharded_producer(node)
        if found:
            return found
        if getattr(getattr(node, "_forward_cls", None), "__module__", "").startswith("dtp."):
            continue  # another dtp node (a row layer, a reduction): its output is whole
        todo.extend((n, depth + 1) for n, _ in node.next_functions)
    return None


def _uncovered(module: nn.Module) -> list:
    return [n for n, p in module._parameters.items() if p is not None and p.requires_grad
            and (not isinstance(p, DTensor) or all(isinstance(q, Replicate) for q in p.placements))]


def _skip(module, args, kwargs, path):
    return None


@traced_as(_skip)  # a traced forward is checked when it runs eagerly, never inside a graph
def _check_first_forward(module, args, kwargs, path):
    """Raise PlanMistake if module's trainable whole parameters read a sharded dtp output; then stop watching."""
    if not torch.is_grad_enabled():
        return None  # no gradient, no mistake yet: watch the next call
    module._dtp_watch.remove()
    del module._dtp_watch
    found = None if hasattr(module, "_dtp_style") else _reads_sharded(
        [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)])
    if found:
        raise PlanMistake(
            f"module {path!r} ({type(module).__name__}) has trainable parameters no plan entry covers "
            f"({', '.join(_uncovered(module))}) and reads {found}: its gradient would be only this rank's share. Give "
            f"it an entry: 'replicated_with_grad_allreduce' (dtp.ReplicateParallel(grad_all_reduce=True)), or gather "
            f"its input first (colwise_rep / output_layouts=Replicate())")
    return None


def watch_uncovered_parameters(model: nn.Module) -> None:
    """One-shot pre-hooks on the modules no style split that own trainable whole parameters (no collective)."""
    for path, module in model.named_modules():
        if hasattr(module, "_dtp_style") or hasattr(module, "_dtp_watch") or not _uncovered(module):
            continue
        module._dtp_watch = module.register_forward_pre_hook(partial(_check_first_forward, path=path), with_kwargs=True)
