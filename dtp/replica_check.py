"""check_replicas(model): are the copies that should be equal equal, and do the shards of each parameter agree?

One all_gather_object over the default group of each parameter's metadata (dtype, global shape,
placements, mesh) and of two integer checksums of its local bytes (a sum and a position-weighted sum,
in wrapping int64: exact, whatever the summation order or thread count).  Every rank then checks the
same table, so a mismatch is raised on every rank alike: replicated copies (a Replicate placement, or
a plain parameter: replicated over the whole group) that differ between ranks, or a DTensor whose
metadata differs between the ranks of its mesh.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

__all__ = ["check_replicas", "ReplicaMismatch"]

_INT_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaMismatch(ValueError):
    """Copies of a replicated parameter differ between ranks, or the shards of one parameter disagree."""


def _checksums(t: torch.Tensor) -> tuple[int, int]:
    flat = t.detach().contiguous().view(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).view(-1)
    ints = flat.view(_INT_VIEWS[flat.element_size()]).to(torch.int64)
    weights = torch.arange(1, ints.numel() + 1, dtype=torch.int64, device=ints.device)
    return int(ints.sum()), int((ints * weights).sum())


def _row(name: str, p: torch.Tensor) -> tuple:
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        meta = (str(p.dtype), tuple(p.shape), tuple(map(str, p.placements)), tuple(mesh.mesh.flatten().tolist()))
        coordinate = tuple(mesh.get_coordinate() or ())
        replicated = tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, Replicate))
        return name, meta, coordinate, replicated, _checksums(p._local_tensor)
    return name, (str(p.dtype), tuple(p.shape), "plain", ()), (), "all", _checksums(p)


def _describe(meta) -> str:
    dtype, shape, placements = meta[:3]
    return f"{dtype} {list(shape)} {placements if placements == 'plain' else list(placements)}"


def _first_mismatch(tables: list) -> str | None:
    """The first problem in the gathered tables (one per rank, in parameter order), or None."""
    names = [[row[0] for row in table] for table in tables]
    for r, rank_names in enumerate(names):
        if rank_names != names[0]:
            diff = [(a, b) for a, b in zip(names[0], rank_names) if a != b] or [(len(names[0]), len(rank_names))]
            return f"ranks 0 and {r} hold different parameters (first difference: {diff[0][0]} vs {diff[0][1]})"
    for i in range(len(tables[0])):
        rows = [table[i] for table in tables]
        name, meta, _, replicated, _ = rows[0]
        plain = replicated == "all"
        members = list(range(len(rows))) if plain else [r for r in range(len(rows)) if r in meta[3]]
        for r in members:
            if rows[r][1] != rows[members[0]][1]:
                return (f"parameter {name!r}: rank {members[0]} has {_describe(rows[members[0]][1])}, rank {r} has "
                        f"{_describe(rows[r][1])}")
        if not plain and not replicated:
            continue  # shards only: their metadata agreed
        copies: dict = {}  # ranks that must hold equal copies: the same coordinate off the replicated mesh dims
        for r in members:
            key = () if plain else tuple(c for d, c in enumerate(rows[r][2]) if d not in replicated)
            copies.setdefault(key, []).append(r)
        for ranks in copies.values():
            for r in ranks[1:]:
                if rows[r][4] != rows[ranks[0]][4]:
                    return (f"parameter {name!r} ({_describe(meta)}) differs between ranks {ranks[0]} and {r}: "
                            f"its replicated copies are not equal")
    return None


@torch.no_grad()
def check_replicas(model: nn.Module) -> None:
    """Every replicated parameter equal over its mesh's replicated dims and every shard's metadata consistent; one
    all_gather_object of checksums (no-op on one rank).  ReplicaMismatch names the first differing parameter and ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    table = [_row(name, p) for name, p in model.named_parameters()]
    tables: list = [None] * dist.get_world_size()
    dist.all_gather_object(tables, table)
    problem = _first_mismatch(tables)
    if problem is not None:
        raise ReplicaMismatch(f"check_replicas: {problem}")
