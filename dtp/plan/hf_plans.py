"""Hugging Face plan strings (`model.tp_plan`, `config.base_model_tp_plan`) as dtp styles, with the meaning
transformers registers for each (transformers.distributed.tensor_parallel):

    colwise                                   ColwiseParallel()                        out Shard(-1)
    colwise_rep, colwise_gather_output        ColwiseParallel(output_layouts=Replicate())
    rowwise                                   RowwiseParallel()                        in Shard(-1), out Replicate
    rowwise_rep, rowwise_split_input          RowwiseParallel(input_layouts=Replicate())
    embedding_rowwise                         VocabParallel()                          E Shard(0), out Replicate
    embedding_colwise                         ColwiseParallel(output_layouts=Replicate())   E Shard(1)
    sequence_parallel                         SequenceParallel(use_local_output=True)
    replicate, local_params                   ReplicateParallel()                      forward on local tensors
    replicated_with_grad_allreduce            ReplicateParallel(grad_all_reduce=True)
    all_reduce                                AllReduceParallel()                      output all-reduced (and, on
                                              its own split parameters, the inputs' gradients: as moe_tp_experts)
    unit_colwise, unit_rowwise                ColwiseParallel() / RowwiseParallel() where tp divides the heads,
                                              else UnitColwiseParallel / UnitRowwiseParallel (heads shared by
                                              groups of ranks: dtp.plan.unit_styles); head_dim from the config
    packed_colwise                            PackedColwiseParallel(blocks=2)          e.g. a fused gate_up_proj
    packed_rowwise                            PackedRowwiseParallel(blocks=2)
    moe_tp_experts                            MoeExpertsParallel()                     experts split over tp
    moe_identity_expert                       MoeIdentityParallel()                    X / tp
    mla_kv_a_proj                             MlaKvAProjParallel(rope_dim=config.qk_rope_head_dim)
    ep_dispatch_experts                       ExpertParallel(input_layouts=Replicate())   experts over ep, tokens
                                              all-to-all; the mesh's ranks share the batch (transformers' ep == tp)
    grouped_gemm                              a parameter: Shard(0) over ep, whole experts per rank, the module's
                                              num_experts made local; a module: as ep_dispatch_experts

A key may also name a parameter (`layers.*.self_attn.sinks: colwise`): it is split as transformers
splits a parameter under that string (colwise: the dim before the last, rowwise: the last, a bias
replicated; embedding_*: dim 0 / 1; the others replicated).  packed_colwise / packed_rowwise split that
dim in 2 equal blocks, each over the ranks (transformers' `_StridedShard(dim, split_factor=2)`: its registered
styles use split_factor=2, so 2 blocks); packed_rowwise keeps a 1-D parameter whole, as transformers does,
while packed_colwise splits a 1-D one by blocks too (transformers shards it contiguously, which would pair a
packed bias with the wrong rows of its weight).
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from dtp.plan.expert_styles import ExpertParallel, check_expert_count
from dtp.plan.moe_styles import AllReduceParallel, MlaKvAProjParallel, MoeExpertsParallel, MoeIdentityParallel
from dtp.ops.packed import PackedLayout, mark_packed, resolve_blocks, shard_packed
from dtp.plan.packed_styles import PackedColwiseParallel, PackedRowwiseParallel
from dtp.runtime.sharding import shard_parameter
from dtp.plan.style import ParallelStyle
from dtp.plan.styles import ColwiseParallel, ReplicateParallel, RowwiseParallel, SequenceParallel, VocabParallel
from dtp.plan.unit_styles import UnitColwiseParallel, UnitRowwiseParallel

__all__ = ["HF_STYLES", "hf_style", "hf_parameter_placement", "ShardParameter", "without_expert_entries"]

HF_PACKED_BLOCKS = 2  # transformers registers its packed styles with split_factor=2 (gate and up)
HF_STYLES = {
    "colwise": lambda: ColwiseParallel(),
    "colwise_rep": lambda: ColwiseParallel(output_layouts=Replicate()),
    "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
    "rowwise": lambda: RowwiseParallel(),
    "rowwise_rep": lambda: RowwiseParallel(input_layouts=Replicate()),
    "rowwise_split_input": lambda: RowwiseParallel(input_layouts=Replicate()),
    "embedding_rowwise": lambda: VocabParallel(),
    "embedding_colwise": lambda: ColwiseParallel(output_layouts=Replicate()),
    "sequence_parallel": lambda: SequenceParallel(use_local_output=True),
    "replicate": lambda: ReplicateParallel(),
    "local_params": lambda: ReplicateParallel(),
    "replicated_with_grad_allreduce": lambda: ReplicateParallel(grad_all_reduce=True),
    "all_reduce": lambda: AllReduceParallel(),
    "unit_colwise": lambda: UnitColwiseParallel(),  # resolved at plan time by the heads and tp (resolve_unit_style)
    "unit_rowwise": lambda: UnitRowwiseParallel(),
    "packed_colwise": lambda: PackedColwiseParallel(blocks=HF_PACKED_BLOCKS),
    "packed_rowwise": lambda: PackedRowwiseParallel(blocks=HF_PACKED_BLOCKS),
    "moe_tp_experts": lambda: MoeExpertsParallel(),
    "moe_identity_expert": lambda: MoeIdentityParallel(),
    "mla_kv_a_proj": lambda: MlaKvAProjParallel(),  # its rope_dim read from the model at plan time
    "ep_dispatch_experts": lambda: ExpertParallel(input_layouts=Replicate()),
    "grouped_gemm": lambda: ExpertParallel(input_layouts=Replicate()),  # its usual place, a parameter: Shard(0)
}


def _known(where: str, name) -> None:
    if name not in HF_STYLES:
        raise ValueError(f"{where}: unknown plan string {name!r}; dtp knows the Hugging Face styles "
                         f"{sorted(HF_STYLES)}")


def hf_style(name: str, where: str) -> ParallelStyle:
    """The dtp style for a Hugging Face plan string on a module."""
    _known(where, name)
    return HF_STYLES[name]()


def hf_parameter_placement(name: str, param_name: str, ndim: int, where: str) -> Placement:
    """The placement transformers gives a parameter that a plan string names directly."""
    _known(where, name)
    if name == "grouped_gemm":
        return Shard(0)
    if name == "packed_colwise":
        return Shard(max(ndim - 2, 0))
    if name == "packed_rowwise":
        return Replicate() if ndim == 1 else Shard(ndim - 1)
    name = name.removeprefix("unit_")  # a parameter entry has no heads to group: as colwise / rowwise
    if name.startswith("colwise"):
        return Shard(max(ndim - 2, 0))
    if name.startswith("rowwise"):
        return Replicate() if param_name.rpartition(".")[2] == "bias" else Shard(max(ndim - 1, 0))
    if name.startswith("embedding"):
        return Shard(0 if name == "embedding_rowwise" else 1)
    return Replicate()


class ShardParameter:
    """A plan entry on one parameter (not a module): split it with `placement`, no forward change; a packed_* string
    splits the placement's dim by blocks (dtp.ops.packed), each over the ranks."""

    def __init__(self, placement: Placement, source: str):
        self.placement, self.source = placement, source
        self.blocks = HF_PACKED_BLOCKS if source.startswith("packed") and isinstance(placement, Shard) else None

    def check(self, param, mesh, where: str) -> None:
        """Errors (every rank, before anything changes) for a parameter this entry cannot split."""
        elsewhere = self.source == "grouped_gemm" and isinstance(param, DTensor) and param.placements == (Replicate(),)
        if isinstance(param, DTensor) and not elsewhere and (param.device_mesh != mesh
                                                             or param.placements not in ((Replicate(),), (self.placement,))):
            raise ValueError(f"{where}: the parameter is already a DTensor {list(param.placements)} on "
                             f"{param.device_mesh}; the plan splits it as {self.placement!r} on {mesh}")
        if self.blocks is not None:
            resolve_blocks(self.blocks, param.shape[self.placement.dim], mesh.size(), where)
        if self.source == "grouped_gemm":
            check_expert_count(param.shape[0], mesh.size(), where)

    def shard(self, owner, name: str, mesh, path: str) -> None:
        """Replace owner's parameter `name` by its DTensor split (no communication)."""
        param = owner._parameters[name]
        if isinstance(param, DTensor) and param.device_mesh != mesh:  # grouped_gemm: whole on a TP plan's mesh
            param = nn.Parameter(param._local_tensor.detach(), requires_grad=param.requires_grad)
        if self.blocks is None:
            owner._parameters[name] = shard_parameter(param, mesh, self.placement, what=path)
            if self.source == "grouped_gemm":  # transformers' MoEParamShard: the experts module counts its own
                owner._dtp_num_experts = param.shape[0]
                if hasattr(owner, "num_experts"):
                    owner.num_experts = param.shape[0] // mesh.size()
            return
        dim = self.placement.dim
        layout = PackedLayout(resolve_blocks(self.blocks, param.shape[dim], mesh.size(), path), dim, mesh.size())
        owner._parameters[name] = shard_packed(param, mesh, layout, what=path)
        mark_packed(owner, name, layout)

    def __repr__(self) -> str:
        packed = f", blocks={self.blocks}" if self.blocks is not None else ""
        return f"ShardParameter({self.placement!r}{packed}, from {self.source!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardParameter) and (other.placement, other.blocks) == (self.placement, self.blocks)


def without_expert_entries(tp_plan: dict, ep_plan: dict) -> dict:
    """tp_plan minus its entries on the ep_plan's modules and their children (transformers: EP rules take precedence)."""
    def under(key, root):
        k, r = key.split("."), root.split(".")
        return len(k) >= len(r) and all(fnmatchcase(a, b) or fnmatchcase(b, a) for a, b in zip(k, r))
    roots = [key for key, value in ep_plan.items() if value != "grouped_gemm"]
    return {key: value for key, value in tp_plan.items() if not any(under(key, root) for root in roots)}
