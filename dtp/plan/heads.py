"""Whole attention heads on every rank: decided from a split projection's shape and its attention module's attributes.

Head counts may be global (n_heads=32) or already per rank (PyTorch's TP example divides n_heads
and n_kv_heads by the tp size before it parallelizes); an error is raised only where a head would
really be cut.  With `head_dim` known, each rank's torch.chunk share of the split features must be
a whole number of heads; without it, a count is accepted if it reads as whole heads either way.
"""

from __future__ import annotations

from torch import nn

from dtp.runtime.collectives import chunk_sizes

__all__ = ["HEAD_ATTRIBUTES", "check_whole_heads"]

HEAD_ATTRIBUTES = ("n_heads", "num_heads", "n_head", "num_attention_heads", "n_kv_heads", "num_key_value_heads")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_whole_heads(attention: nn.Module, attention_path: str, features: int, tp: int, where: str) -> None:
    """ValueError when splitting `features` (a projection's split dim) over tp ranks would cut a head of `attention`."""
    counts = {attr: getattr(attention, attr) for attr in HEAD_ATTRIBUTES if _int(getattr(attention, attr, None))}
    head_dim = getattr(attention, "head_dim", None)
    shares = chunk_sizes(features, tp)
    described = ", ".join(f"{k}={v}" for k, v in counts.items())
    if features in counts.values() and not (_int(head_dim) and features in {n * head_dim for n in counts.values()}):
        return  # one value per head (a per-head gate, as Laguna's g_proj): each rank keeps its heads' values
    if _int(head_dim):
        if features % head_dim:
            return  # not a projection onto heads of this size
        if any(share % head_dim for share in shares):
            raise ValueError(f"{where}: the attention module {attention_path or '<root>'!r} ({described}, "
                             f"head_dim={head_dim}) would have a head cut: {features} features = {features // head_dim} "
                             f"heads split over the tp size {tp} as {list(shares)}; each rank must hold whole heads")
        return
    for attr, heads in counts.items():
        if features % heads:
            continue  # not this count's projection
        if heads % tp == 0 or features % (heads * tp) == 0:  # whole heads read as global, or as per-rank counts
            return
    if counts and any(features % heads == 0 for heads in counts.values()):
        raise ValueError(f"{where}: the attention module {attention_path or '<root>'!r} has {described}, which is not "
                         f"divisible by the tp size {tp} (nor reads as a per-rank count); each rank must hold whole heads")
