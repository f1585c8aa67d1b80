"""dtp.comms' prediction for ExpertParallel / ExpertTensorParallel experts: their all-to-alls (and all-gathers or
all-reduces) per training step, from the plan alone; sizes that depend on the routing are -1."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import Replicate

from dtp.runtime.collectives import chunk_sizes

__all__ = ["predict_experts"]


def predict_experts(pred, path: str, m: nn.Module, style) -> None:
    """Counts, tokens and outputs all-to-all forward, the mirror two backward (-1 elements: what this rank's experts
    received, known only once routed); a shared batch adds its slicing's all-gathers, expert-tensor parallelism one
    tp all-reduce each way."""
    k, d, n = _top_k(pred.model, path, m), _width(m), pred.n
    etp = type(style).__name__ == "ExpertTensorParallel"  # its tp ranks all dispatch their (shared) tokens
    batch = m._dtp_mesh if isinstance(style.input_layouts, Replicate) else None if etp else style.tp_mesh
    shared = batch.size() if batch is not None else 1
    mine = chunk_sizes(n, shared)[batch.get_local_rank()] if shared > 1 else n  # this rank's slice
    pred.emit("forward", "all_to_all", m._dtp_num_experts, path, axis="ep", dtype=torch.int64)
    pred.emit("forward", "all_to_all", mine * k * d, path, axis="ep")
    pred.emit("forward", "all_to_all", -1, path, axis="ep")
    pred.emit("backward", "all_to_all", mine * k * d, path, axis="ep")
    pred.emit("backward", "all_to_all", -1, path, axis="ep")
    if etp:  # each expert's tp shares summed over the rows that arrived, and the rows' gradients
        pred.emit("forward", "all_reduce", -1, path)
        pred.emit("backward", "all_reduce", -1, path)
    if shared > 1:
        padded = max(chunk_sizes(n, shared)) * shared
        pred.emit("forward", "all_gather", padded * d, path)
        pred.emit("backward", "all_gather", padded * d, path)
        pred.emit("backward", "all_gather", padded * k, path)


def _top_k(model: nn.Module, path: str, experts: nn.Module) -> int:
    """Experts per token: the MoE block's top_k (its own, its router's or gate's), else the config's."""
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    for owner in (parent, getattr(parent, "router", None), getattr(parent, "gate", None)):
        if isinstance(getattr(owner, "top_k", None), int):
            return owner.top_k
    return experts.config.num_experts_per_tok


def _width(experts: nn.Module) -> int:
    """The experts' input width: their hidden_dim, else the last dim of their first stacked weight."""
    return getattr(experts, "hidden_dim", None) or next(experts.parameters()).shape[-1]
