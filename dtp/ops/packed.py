"""Packed projections: one weight holding several blocks along one dim (q, k and v in nanoGPT's `c_attn`, gate and
up in a fused `gate_up_proj`), split block by block so that each rank holds its slice of every block.

The layout.  For blocks b_0 .. b_{n-1} along `dim` (each divisible by the tp size), rank r holds

    local_r = cat_i chunk_r(block_i)          chunk_r: the r-th of tp equal slices (as torch.chunk)

so a column-parallel forward on the local shard gives [q_r, k_r, v_r] with no collective.  The parameter is an
ordinary DTensor `Shard(dim)` of the *packed-order* tensor P = cat_r local_r, a permutation of the original W
along dim.  DTensor, optimizers (foreach / fused AdamW), clip_grad_norm_, FSDP2 and DCP see a plain Shard and
work unchanged; only the global view (`full_tensor()`) is P, not W.  The owning module records the permutation
as `module._dtp_packed[name] = PackedLayout(blocks, dim, tp)`, and dtp.full_state_dict / load_full_state_dict /
save_checkpoint / load_checkpoint use it to give back and take W itself: state dicts and checkpoints hold the
original packed layout, so they load at any tp size, or into a model that was never parallelized.
`dtp.packed_layouts(model)` gives the layouts by name (`layout.unpack(p.grad.full_tensor())` is W's gradient).

Why not torch's `_StridedShard(dim, split_factor=n)`, which describes this layout for equal blocks (checked on
torch 2.13 and 2.7): on 2.13 full_tensor, redistribute and pointwise ops handle it, but DCP cannot save it on
either version (a rank's data is not one box: "overlapping chunks"); on 2.7 pointwise ops and redistribute give
silently wrong values and uneven sizes are refused; and it cannot describe unequal blocks (GQA's q, k, v).

Blocks that do not divide by tp are an error naming the block, its size and tp: the shards of P must have
torch.chunk's sizes for DTensor to describe them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dtp.runtime.conversions import from_local, to_local
from dtp.runtime.sharding import shard_parameter

__all__ = ["PackedLayout", "resolve_blocks", "shard_packed", "mark_packed", "named_layouts", "PackedOutput"]


def resolve_blocks(blocks, size: int, tp: int, where: str) -> tuple[int, ...]:
    """The block sizes along a packed dim of `size`: an int n is n equal blocks, a sequence lists the sizes; each
    must divide by tp.  ValueError / TypeError naming the argument and the numbers otherwise."""
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if blocks < 1 or size % blocks:
            raise ValueError(f"{where}: blocks={blocks} equal blocks cannot tile the {size} packed features "
                             f"(blocks must be a positive divisor of {size}, or a sequence of block sizes)")
        sizes = (size // blocks,) * blocks
    elif isinstance(blocks, (tuple, list)) and blocks and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in blocks):
        sizes = tuple(blocks)
        if sum(sizes) != size:
            raise ValueError(f"{where}: block sizes {list(sizes)} sum to {sum(sizes)}, but the packed dim has "
                             f"{size} features")
    else:
        raise TypeError(f"{where}: blocks must be a positive int (that many equal blocks) or a non-empty sequence of "
                        f"positive block sizes, got {blocks!r}")
    for i, b in enumerate(sizes):
        if b % tp:
            raise ValueError(f"{where}: block {i} has {b} features, which the tp size {tp} does not divide; every "
                             f"block of a packed projection must split evenly (block sizes {list(sizes)})")
    return sizes


@lru_cache(maxsize=256)
def _order(blocks: tuple, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse): P = W[perm] along the packed dim, and W = P[inverse]."""
    starts = [sum(blocks[:i]) for i in range(len(blocks))]
    perm = [s + r * (b // tp) + j for r in range(tp) for s, b in zip(starts, blocks) for j in range(b // tp)]
    perm = torch.tensor(perm, dtype=torch.long)
    return perm, torch.argsort(perm)


@dataclass(frozen=True)
class PackedLayout:
    """Blocks of `blocks` sizes along `dim`, split over `tp` ranks block by block (see the module docstring)."""

    blocks: tuple
    dim: int
    tp: int

    def _index(self, t: torch.Tensor, inverse: bool) -> torch.Tensor:
        return _order(self.blocks, self.tp)[int(inverse)].to(t.device)

    def pack(self, full: torch.Tensor) -> torch.Tensor:
        """P = W[perm] along dim: the original layout -> the packed order a Shard(dim) splits (local index_select)."""
        return full if self.tp == 1 else full.index_select(self.dim % full.dim(), self._index(full, False))

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """W = P[perm⁻¹] along dim: a gathered packed-order tensor -> the original layout (local index_select)."""
        return packed if self.tp == 1 else packed.index_select(self.dim % packed.dim(), self._index(packed, True))


def shard_packed(full, mesh: DeviceMesh, layout: PackedLayout, *, what: str) -> nn.Parameter:
    """nn.Parameter(DTensor Shard(dim)) holding this rank's cat_i chunk_r(block_i) of `full` (no communication).

    A DTensor already split this way is kept (a plan applied again); a replicated one is sliced locally."""
    requires_grad = full.requires_grad if isinstance(full, nn.Parameter) else True
    placement = Shard(layout.dim % full.dim())
    if isinstance(full, DTensor):
        if full.device_mesh == mesh and full.placements == (placement,):
            return full
        if full.device_mesh != mesh or full.placements != (Replicate(),):
            raise ValueError(f"{what} is already a DTensor {list(full.placements)} on {full.device_mesh}; it cannot be "
                             f"split by blocks on {mesh}")
        full = full._local_tensor
    packed = layout.pack(full.detach())
    return shard_parameter(packed, mesh, placement, requires_grad=requires_grad, what=what)


def mark_packed(module: nn.Module, name: str, layout: PackedLayout) -> None:
    """Record that module's parameter `name` holds `layout`'s packed order (read by state dicts and checkpoints)."""
    if not hasattr(module, "_dtp_packed"):
        module._dtp_packed = {}
    module._dtp_packed[name] = layout


def named_layouts(model: nn.Module):
    """(state-dict name, PackedLayout) for every packed parameter of model (names as model.state_dict() gives them)."""
    for path, module in model.named_modules():
        for name, layout in getattr(module, "_dtp_packed", {}).items():
            yield (f"{path}.{name}" if path else name), layout


class PackedOutput:
    """A column forward whose gathered (Replicate) output comes back in the original block order: Y[..., perm⁻¹]
    after the all-gather (a local index_select, no extra collective)."""

    def __init__(self, forward, layout: PackedLayout):
        self.forward = forward
        self.index = _order(layout.blocks, layout.tp)[1]  # computed once: nothing cached is looked up per call

    def __call__(self, x, weight, bias):
        y = self.forward(x, weight, bias)
        if isinstance(y, DTensor):  # Replicate: every rank holds the whole output, in packed order
            local = to_local(y)
            local = local.index_select(-1, self.index.to(local.device))
            return from_local(local, y.device_mesh, y.placements[0], local.shape)
        return y.index_select(-1, self.index.to(y.device))
