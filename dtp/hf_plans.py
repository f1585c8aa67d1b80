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
    all_reduce                                PrepareModuleOutput(Partial -> Replicate)

A key may also name a parameter (`layers.*.self_attn.sinks: colwise`): it is split as transformers
splits a parameter under that string (colwise: the dim before the last, rowwise: the last, a bias
replicated; embedding_*: dim 0 / 1; the others replicated).
"""

from __future__ import annotations

from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from .module_io import PrepareModuleOutput
from .style_base import ParallelStyle
from .styles import ColwiseParallel, ReplicateParallel, RowwiseParallel, SequenceParallel, VocabParallel

__all__ = ["HF_STYLES", "hf_style", "hf_parameter_placement", "ShardParameter"]

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
    "all_reduce": lambda: PrepareModuleOutput(output_layouts=Partial(), desired_output_layouts=Replicate()),
}
_NOT_YET = {"packed_colwise", "packed_rowwise"}


def _known(where: str, name) -> None:
    if name in _NOT_YET:
        raise ValueError(f"{where}: the Hugging Face style {name!r} (a packed q/k/v or gate/up weight) needs packed "
                         f"sharding, which dtp does not have yet; split the packed projection into separate ones")
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
    if name.startswith("colwise"):
        return Shard(max(ndim - 2, 0))
    if name.startswith("rowwise"):
        return Replicate() if param_name.rpartition(".")[2] == "bias" else Shard(max(ndim - 1, 0))
    if name.startswith("embedding"):
        return Shard(0 if name == "embedding_rowwise" else 1)
    return Replicate()


class ShardParameter:
    """A plan entry on one parameter (not a module): split it with `placement`, no forward change."""

    def __init__(self, placement: Placement, source: str):
        self.placement, self.source = placement, source

    def __repr__(self) -> str:
        return f"ShardParameter({self.placement!r}, from {self.source!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardParameter) and other.placement == self.placement
