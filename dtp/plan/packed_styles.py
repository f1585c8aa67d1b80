"""Plan styles for packed projections (see dtp.ops.packed for the layout): ColwiseParallel / RowwiseParallel split block
by block, with exactly their forward, backward and collectives.

    PackedColwiseParallel(blocks=3)               nanoGPT c_attn = Linear(d, 3d): rank r holds q_r, k_r, v_r
    PackedColwiseParallel(blocks=(q, kv, kv))     GQA qkv_proj with unequal blocks
    PackedColwiseParallel(blocks=2)               gate_up_proj; Hugging Face "packed_colwise"
    PackedRowwiseParallel(blocks=2)               input features packed; Hugging Face "packed_rowwise"

`blocks` is an int (that many equal blocks, as transformers' split_factor) or the block sizes.
"""

from __future__ import annotations

from types import MethodType

from torch import nn
from torch.distributed.tensor import Placement, Replicate, Shard

from dtp.ops.linear import ColumnForward, RowForward
from dtp.ops.packed import PackedLayout, PackedOutput, mark_packed, resolve_blocks, shard_packed
from dtp.runtime.sharding import shard_parameter
from dtp.plan.styles import ColwiseParallel, RowwiseParallel, has_own_forward

__all__ = ["PackedColwiseParallel", "PackedRowwiseParallel"]


def _check_plain_linear(style, module, where) -> None:
    if has_own_forward(module):
        raise TypeError(f"{where}: {type(style).__name__} runs dtp's column/row forward on the local packed shard; "
                        f"{type(module).__module__}.{type(module).__name__} has a forward of its own, which would see "
                        f"the weight's packed order (split the projection, or parallelize it unpacked)")


class PackedColwiseParallel(ColwiseParallel):
    """ColwiseParallel of a weight packing blocks along its output features: W_r = cat_i chunk_r(W_i), b likewise;
    output local = [block_0 r-th slice, block_1 r-th slice, ...]; forward all-gather only if output Replicate (then
    put back in block order locally), backward all-reduce of dX — ColwiseParallel's collectives, no extra one."""

    fits = (nn.Linear,)

    def __init__(self, *, blocks, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts, use_local_output=use_local_output)
        self.blocks = tuple(blocks) if isinstance(blocks, list) else blocks

    def block_sizes(self, module: nn.Module, tp: int, where: str = "PackedColwiseParallel") -> tuple[int, ...]:
        """The sizes of the output-feature blocks of module (checked: they tile out_features and divide by tp)."""
        return resolve_blocks(self.blocks, module.out_features, tp, where)

    def check(self, module, mesh, where) -> None:
        super().check(module, mesh, where)
        _check_plain_linear(self, module, where)
        out = self.output_layouts
        if not (isinstance(out, Replicate) or (isinstance(out, Shard) and out.dim == -1)):
            raise ValueError(f"{where}: output_layouts={out!r} cannot be honoured by a packed projection; allowed: "
                             f"Shard(-1) (this rank's slice of every block) or Replicate() (gathered, in block order)")
        if isinstance(out, Shard) and not self.use_local_output:
            raise ValueError(f"{where}: use_local_output=False with a Shard(-1) output cannot be honoured: the packed "
                             f"local output [block_0 slice, block_1 slice, ...] is no torch placement of the full output")
        self.block_sizes(module, mesh.size(), where)

    def _apply(self, module, mesh) -> None:
        where = f"PackedColwiseParallel({module._dtp_path!r})"
        layout = PackedLayout(self.block_sizes(module, mesh.size(), where), 0, mesh.size())
        for name in ("weight", "bias"):
            if module._parameters.get(name) is not None:
                module._parameters[name] = shard_packed(module._parameters[name], mesh, layout,
                                                        what=f"{module._dtp_path}.{name}")
                mark_packed(module, name, layout)
        forward = ColumnForward(mesh, module.in_features, module.out_features, input_layout=self.input_layouts,
                                output_layout=self.output_layouts, use_local_output=self.use_local_output, name=where)
        module._dtp_forward = PackedOutput(forward, layout) if isinstance(self.output_layouts, Replicate) else forward
        module.forward = MethodType(_linear_forward, module)


class PackedRowwiseParallel(RowwiseParallel):
    """RowwiseParallel of a weight packing blocks along its input features: W_r = cat_i chunk_r(W_i) on dim 1, b
    replicated; the input is this rank's packed slice (a PackedColwiseParallel output); forward all-reduce of Y."""

    fits = (nn.Linear,)

    def __init__(self, *, blocks, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts, use_local_output=use_local_output)
        self.blocks = tuple(blocks) if isinstance(blocks, list) else blocks

    def block_sizes(self, module: nn.Module, tp: int, where: str = "PackedRowwiseParallel") -> tuple[int, ...]:
        """The sizes of the input-feature blocks of module (checked: they tile in_features and divide by tp)."""
        return resolve_blocks(self.blocks, module.in_features, tp, where)

    def check(self, module, mesh, where) -> None:
        super().check(module, mesh, where)
        _check_plain_linear(self, module, where)
        declared = self.layouts(module)[0]
        if not (isinstance(declared, Shard) and declared.dim == -1):
            raise ValueError(f"{where}: input_layouts={declared!r} cannot be honoured by a packed projection; allowed: "
                             f"Shard(-1), this rank's packed slice [block_0 slice, block_1 slice, ...]")
        self.block_sizes(module, mesh.size(), where)

    def _apply(self, module, mesh) -> None:
        where = f"PackedRowwiseParallel({module._dtp_path!r})"
        layout = PackedLayout(self.block_sizes(module, mesh.size(), where), 1, mesh.size())
        module._parameters["weight"] = shard_packed(module._parameters["weight"], mesh, layout,
                                                    what=f"{module._dtp_path}.weight")
        mark_packed(module, "weight", layout)
        if module._parameters.get("bias") is not None:
            module._parameters["bias"] = shard_parameter(module._parameters["bias"], mesh, Replicate(),
                                                         what=f"{module._dtp_path}.bias")
        module._dtp_forward = RowForward(mesh, module.in_features, input_layout=Shard(-1),
                                         output_layout=self.output_layouts, use_local_output=self.use_local_output,
                                         name=where)
        module.forward = MethodType(_linear_forward, module)


def _linear_forward(self, x):
    return self._dtp_forward(x, self.weight, self.bias)
