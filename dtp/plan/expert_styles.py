"""ExpertParallel: a mixture-of-experts' experts split over the mesh's ep axis, whole experts per rank, tokens
dispatched to them by all-to-all (torchtitan's ExpertParallel; transformers' `ep_dispatch_experts`).

The experts module is called as transformers' experts are, `experts(hidden (N, d), top_k_index (N, k),
top_k_weights (N, k)) -> (N, d)` = Σ_j w_tj · E_{i_tj}(X_t), and its own parameters are the experts' weights
stacked on dim 0 (gate_up_proj / down_proj, or w1 / w2 / w3, biases too).  Each becomes a Shard(0) DTensor over
the mesh; the module's forward then runs on this rank's experts only (its `num_experts` is set to the local
count, local expert ids, unit weights), between dtp.ops.expert_dispatch's all-to-alls.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dtp.mesh import check_member, common_root
from dtp.ops.expert_dispatch import expert_parallel
from dtp.ops.local_forward import local_forward
from dtp.plan.own_layout import check_own_layout
from dtp.plan.style import ParallelStyle
from dtp.runtime.collectives import axis_of
from dtp.runtime.mappings import copy_to, reduce_from
from dtp.runtime.sharding import shard_parameter

__all__ = ["ExpertParallel", "ExpertTensorParallel", "check_expert_count", "shard_experts_"]


def check_expert_count(num_experts: int, ep: int, where: str) -> None:
    """ValueError naming the module, the expert count and ep when the experts do not divide over ep (no collective)."""
    if num_experts % ep:
        raise ValueError(f"{where}: {num_experts} experts cannot be split over ep={ep} ranks; the number of experts "
                         f"must be a multiple of ep (each rank holds {num_experts}/ep whole experts)")


def _stacked(module, where: str) -> int:
    """The expert count of a module whose own parameters are all stacked on dim 0 (ValueError otherwise)."""
    params = [(n, p) for n, p in module.named_parameters(recurse=False)]
    if not params:
        raise ValueError(f"{where}: ExpertParallel needs the experts' weights stacked on dim 0 as the module's own "
                         f"parameters; {type(module).__name__} has none")
    count = params[0][1].shape[0] if params[0][1].dim() else 0
    for name, p in params:
        if p.dim() == 0 or p.shape[0] != count:
            raise ValueError(f"{where}: ExpertParallel needs every parameter stacked on dim 0 by expert; {name!r} has "
                             f"shape {tuple(p.shape)} but {params[0][0]!r} holds {count} experts")
    return count


def shard_experts_(module, mesh, where: str) -> int:
    """The module's stacked expert weights as Shard(0) DTensors over the mesh (no communication); its num_experts set
    to the local count (transformers' grouped_gemm); returns the global count."""
    count = None
    for name, p in list(module._parameters.items()):
        if p is None:
            continue
        count = p.shape[0]
        if isinstance(p, DTensor) and p.device_mesh != mesh and _replicated(p):  # whole, from another plan's rest
            p = nn.Parameter(p._local_tensor.detach(), requires_grad=p.requires_grad)
        if not (isinstance(p, DTensor) and p.placements == (Shard(0),)):
            module._parameters[name] = shard_parameter(p, mesh, Shard(0), what=f"{where} parameter {name!r}")
    module._dtp_num_experts = count
    if hasattr(module, "num_experts"):
        module.num_experts = count // mesh.size()
    if hasattr(module, "_is_expert_parallel"):
        module._is_expert_parallel = True
    return count


def _replicated(p) -> bool:
    return all(isinstance(placement, Replicate) for placement in p.placements)


def _run_local(module, tp_axis=None):
    def run(rows, local_ids):
        ones = torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        if tp_axis is None:
            return local_forward(module, (rows, local_ids.unsqueeze(-1), ones), {})
        out = local_forward(module, (copy_to(rows, tp_axis), local_ids.unsqueeze(-1), ones), {})
        return reduce_from(out, tp_axis)  # each tp rank's share of every expert's down projection, summed
    return run


def _plain(x):
    return x.to_local() if isinstance(x, DTensor) else x


def _experts_forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
    check_own_layout(self)
    style = self._dtp_style
    axis = axis_of(self._dtp_mesh)
    batch_axis = axis if isinstance(style.input_layouts, Replicate) else (
        axis_of(style.tp_mesh) if style.tp_mesh is not None else None)
    hidden = _plain(hidden_states)
    tp_axis = axis_of(style.tp_mesh) if isinstance(style, ExpertTensorParallel) else None
    if tp_axis is not None:
        batch_axis = None  # the tp ranks hold the same tokens and all dispatch them: each runs its share of the experts
    out = expert_parallel(hidden, _plain(top_k_index), _plain(top_k_weights), self._dtp_num_experts,
                          _run_local(self, tp_axis), axis, batch_axis)
    return out.to(hidden.dtype)


class ExpertParallel(ParallelStyle):
    """Y_t = Σ_j w_tj · E_{i_tj}(X_t), experts Shard(0) over the mesh: forward all-to-alls of the counts, the tokens and
    the outputs, backward the mirror two (dtp.ops.expert_dispatch).

    input_layouts: the tokens' layout over the mesh.  Shard(0) (the default, torchtitan's ep folded into dp): each
    rank holds its own tokens.  Replicate(): every rank holds the same tokens (as under TP); each dispatches its
    torch.chunk slice, and the outputs are all-gathered (forward 1 all-gather, backward 2).
    tp_mesh: a smaller group of ranks of the mesh that share one batch (transformers' ep > tp layout): the tokens
    are sliced over it before the dispatch and gathered after.
    """

    reads_own_shards = True  # its forward runs this rank's experts: dtp.plan.own_layout checks their layout

    def __init__(self, *, input_layouts=Shard(0), tp_mesh=None):
        if not (isinstance(input_layouts, Replicate) or input_layouts == Shard(0)):
            raise ValueError(f"ExpertParallel: input_layouts must be Shard(0) (each rank its own tokens) or Replicate() "
                             f"(every rank the same tokens), got {input_layouts!r}")
        if tp_mesh is not None and isinstance(input_layouts, Replicate):
            raise ValueError("ExpertParallel: give tp_mesh (ranks sharing a batch) or input_layouts=Replicate() "
                             "(all ranks share it), not both")
        self.input_layouts, self.tp_mesh = input_layouts, tp_mesh

    def check(self, module, mesh, where: str) -> None:
        previous = getattr(module, "_dtp_style", None)
        if previous is not None and not self.is_applied(module, mesh):
            raise ValueError(f"{where}: the module was already parallelized with {previous!r} on "
                             f"{module._dtp_mesh}; it cannot also take {self!r}")
        for name, p in module.named_parameters(recurse=False):  # replicated on another mesh (a TP plan's rest): whole
            if isinstance(p, DTensor) and p.device_mesh != mesh and not _replicated(p):
                raise ValueError(f"{where}: parameter {name!r} is already split on another device mesh "
                                 f"({p.device_mesh}, placements {list(p.placements)}); this plan uses {mesh}")
        if self.is_applied(module, mesh):
            return
        check_expert_count(_stacked(module, where), mesh.size(), where)
        if self.tp_mesh is not None:
            check_member(self.tp_mesh, where)
            self._check_tp_mesh(mesh, where)

    def _check_tp_mesh(self, mesh, where: str) -> None:
        """The ranks sharing a batch lie inside the ep mesh."""
        outside = set(self.tp_mesh.mesh.flatten().tolist()) - set(mesh.mesh.flatten().tolist())
        if self.tp_mesh.ndim != 1 or outside:
            raise ValueError(f"{where}: tp_mesh must be a 1-D mesh of ranks inside the ep mesh "
                             f"{mesh.mesh.flatten().tolist()}; got {self.tp_mesh}")

    def _apply(self, module, mesh) -> None:
        shard_experts_(module, mesh, module._dtp_path)
        module.forward = MethodType(_experts_forward, module)


class ExpertTensorParallel(ExpertParallel):
    """Experts over ep and each expert split over tp (torchtitan's ExpertTensorParallel): W Shard(0) over ep and
    colwise (Shard(1)) / rowwise (Shard(2)) over tp, DTensors on the 2-D (ep, tp) mesh.  The ranks of a tp group hold
    the same tokens and dispatch them alike; each runs its share of its experts between copy_to and reduce_from:
    forward + 1 all-reduce over tp, backward + 1 (the rows' gradient), besides ExpertParallel's all-to-alls."""

    def __init__(self, *, tp_mesh, colwise=("w1", "w3"), rowwise=("w2",)):
        self.input_layouts, self.tp_mesh = Shard(0), tp_mesh
        self.colwise, self.rowwise = tuple(colwise), tuple(rowwise)

    def _mesh_2d(self, mesh, where: str):
        names = (mesh.mesh_dim_names or ("?",))[0], (self.tp_mesh.mesh_dim_names or ("?",))[0]
        root = common_root((mesh, self.tp_mesh), names)
        if root is None or not set(names) <= set(root.mesh_dim_names or ()):
            raise ValueError(f"{where}: ExpertTensorParallel needs the ep and tp meshes to be two axes of one mesh "
                             f"(dtp.init_mesh(dp=, ep=, tp=) with ep dividing dp); got {mesh} and {self.tp_mesh}")
        return root[names]

    def _check_tp_mesh(self, mesh, where: str) -> None:
        self._mesh_2d(mesh, where)

    def check(self, module, mesh, where: str) -> None:
        super().check(module, mesh, where)
        names = {n for n, _ in module.named_parameters(recurse=False)}
        if set(self.colwise + self.rowwise) != names:
            raise ValueError(f"{where}: ExpertTensorParallel splits {sorted(self.colwise)} colwise and "
                             f"{sorted(self.rowwise)} rowwise, but the experts' parameters are {sorted(names)}")

    def _apply(self, module, mesh) -> None:
        mesh2 = self._mesh_2d(mesh, module._dtp_path)
        for name, p in list(module._parameters.items()):
            split = Shard(1) if name in self.colwise else Shard(2)
            full = p._local_tensor if isinstance(p, DTensor) else p  # whole (replicated elsewhere) or plain
            module._parameters[name] = nn.Parameter(distribute_tensor(full.detach(), mesh2, [Shard(0), split],
                                                                      src_data_rank=None), p.requires_grad)
        module._dtp_num_experts = next(iter(module._parameters.values())).shape[0]
        if hasattr(module, "num_experts"):
            module.num_experts = module._dtp_num_experts // mesh.size()
        module.forward = MethodType(_experts_forward, module)
