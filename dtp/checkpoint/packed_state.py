"""DCP state dicts of packed projections (dtp.ops.packed) in their original layout, so checkpoints reshard to any tp.

A packed parameter is a DTensor Shard(dim) of a tp-dependent permutation of its weight.  Saved as it is, a
checkpoint would hold that permutation, and loading it at another tp size would mix the blocks.  So a save
writes, for each packed parameter and each optimizer state tensor of its shape, a DTensor of the original layout
(every Shard kept on its dim, now of the original order); a load reads into such buffers and converts them back
into the model's packed order.  Each conversion gathers the tensor once (one all-gather, every rank in the same
order): checkpoints pay it, the training step does not.
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor import empty as dtensor_empty

from dtp.checkpoint.full import plain_name
from dtp.ops.packed import PackedLayout

__all__ = ["to_original_layout", "to_packed_layout"]


def _original_placements(t: DTensor) -> list:
    return [Shard(p.dim) if isinstance(p, Shard) else Replicate() for p in t.placements]


def _targets(state: dict, layouts: dict):
    """(container, key, layout) for each packed tensor in a {"model": ..., "optim": ...} DCP state, in a fixed order."""
    model = state.get("model", {})
    for key in list(model):
        layout = layouts.get(plain_name(key))
        if layout is not None and layout.tp > 1 and isinstance(model[key], DTensor):
            yield model, key, layout
    for key, entry in (state.get("optim", {}).get("state", {}) or {}).items():
        layout = layouts.get(plain_name(key)) if isinstance(key, str) else None
        if layout is None or layout.tp == 1 or not isinstance(entry, dict):
            continue
        shape = tuple(model[key].shape) if key in model else None
        for name in sorted(entry):
            value = entry[name]
            if isinstance(value, DTensor) and (shape is None or tuple(value.shape) == shape):
                yield entry, name, layout


def to_original_layout(state: dict, layouts: dict[str, PackedLayout], *, empty: bool = False) -> tuple[dict, dict]:
    """A copy of a DCP state (its containers copied: an optimizer's live state is never touched) in which each packed
    tensor (parameter, and its optimizer state of the same shape) is a DTensor of the original layout; with
    empty=True an uninitialised one to load into (no communication), else the values (one all-gather per tensor).
    Returns (the new state, {id of each new tensor: (the packed tensor it replaced, its layout)})."""
    state, replaced = _copy_containers(state), {}
    for box, key, layout in list(_targets(state, layouts)):
        t = box[key]
        placements = _original_placements(t)
        if empty:
            new = dtensor_empty(t.shape, dtype=t.dtype, device_mesh=t.device_mesh, placements=placements)
        else:
            new = distribute_tensor(layout.unpack(t.full_tensor()), t.device_mesh, placements, src_data_rank=None)
        box[key] = new
        replaced[id(new)] = (t, layout)
    return state, replaced


def to_packed_layout(state: dict, replaced: dict) -> None:
    """In place: the inverse of to_original_layout for the tensors it replaced, each laid out again like the packed
    tensor it replaced (one all-gather per tensor, every rank in the same order)."""
    for box, key in list(_boxes(state)):
        entry = replaced.get(id(box[key]))
        if entry is None:
            continue
        like, layout = entry
        full = layout.pack(box[key].full_tensor())
        box[key] = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _copy_containers(tree):
    if isinstance(tree, dict):
        return {k: _copy_containers(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_copy_containers(v) for v in tree]
    return tree


def _boxes(tree):
    """(container, key) of every tensor in a nested dict / list, in a fixed order."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            yield from _boxes(value)
        elif isinstance(value, DTensor):
            yield tree, key
