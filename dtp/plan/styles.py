"""Plan styles with torch's names and defaults: how one module is split.

    ColwiseParallel    nn.Linear: W, b Shard(0); in Replicate; out Shard(-1) (or Replicate: all-gather)
                       nn.Embedding: E Shard(1); out Shard(-1) (or Replicate: all-gather)
    RowwiseParallel    nn.Linear: W Shard(1), b Replicate; in Shard(-1) (or Replicate); out Replicate: all-reduce
                       (or Shard(d): reduce-scatter); nn.Embedding: vocab parallel, E Shard(0), ids Replicate
    VocabParallel      nn.Embedding only: RowwiseParallel on an embedding
    SequenceParallel   any module (norms, dropout): runs on sequence shards, parameters replicated
    ReplicateParallel  any module: whole on every rank, forward on local tensors (gradients summed over tp on request)

Inputs and outputs may be in any layout torch's styles accept: Megatron's layouts run on dtp's fused
paths, others through DTensor (torch's semantics).  A module keeps its class, its parameter names,
their requires_grad and their values (each rank keeps its slice).  An nn.Linear / nn.Embedding
subclass with a forward of its own (LoRA adapters, quantized wrappers) keeps that forward: it runs on
DTensors with the parameter placements torch's styles give, as torch runs it.
"""

from __future__ import annotations

import contextlib
from types import MethodType

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from dtp.ops.embedding import OwnVocabLookup, column_embedding, replicated_ids, vocab_parallel_embedding
from dtp.ops.dtensor_forward import dtensor_forward, is_last_dim
from dtp.ops.linear import ColumnForward, RowForward
from dtp.runtime.sharding import shard_parameter
from dtp.runtime.conversions import replicated_local, to_local
from dtp.ops.local_forward import local_forward
from dtp.plan.replicated import replicate_own_, replicate_parameters_
from dtp.ops.sequence import sequence_parallel_forward
from dtp.plan.style import ParallelStyle

__all__ = ["ColwiseParallel", "RowwiseParallel", "VocabParallel", "SequenceParallel", "ReplicateParallel"]


def _check(where: str, what: str, value, allowed: tuple) -> None:
    if not isinstance(value, allowed):
        names = " or ".join(f"{c.__name__}()" if c is not Shard else "Shard(d)" for c in allowed)
        raise ValueError(f"{where}: {what}={value!r} cannot be honoured here; allowed: {names}")


def _base(module: nn.Module) -> type:
    return nn.Embedding if isinstance(module, nn.Embedding) else nn.Linear


def has_own_forward(module: nn.Module) -> bool:
    """True for an nn.Linear / nn.Embedding subclass whose forward is not the base class's."""
    return type(module).forward is not _base(module).forward


class _SplitStyle(ParallelStyle):
    """Colwise / Rowwise: the parameter placements, the fast forward, and the subclass path."""

    fits = (nn.Linear, nn.Embedding)

    def placements(self, module: nn.Module) -> dict:
        raise NotImplementedError

    def _check_layouts(self, module, where) -> None:
        for name, placement in self.placements(module).items():
            param = module._parameters.get(name)
            if isinstance(param, DTensor) and param.placements not in ((Replicate(),), (placement,)):
                raise ValueError(f"{where}: parameter {name!r} is already split as {list(param.placements)}; "
                                 f"{type(self).__name__} would split it as {placement!r}")

    def _apply(self, module, mesh) -> None:
        for name, placement in self.placements(module).items():
            if module._parameters.get(name) is not None:
                module._parameters[name] = shard_parameter(module._parameters[name], mesh, placement,
                                                           what=f"{module._dtp_path}.{name}")
        if has_own_forward(module):  # its own math, on DTensors; everything it reads must be a DTensor
            for sub in module.modules():
                replicate_own_(sub, mesh)
                for name, buf in list(sub._buffers.items()):
                    if buf is not None and not isinstance(buf, DTensor):
                        sub._buffers[name] = DTensor.from_local(buf, mesh, [Replicate()], run_check=False)
            module.forward = MethodType(_subclass_forward, module)
        else:
            self._apply_fast(module, mesh)

    def _apply_fast(self, module, mesh) -> None:
        raise NotImplementedError


class ColwiseParallel(_SplitStyle):
    """Split output features (Linear W Shard(0), Embedding E Shard(1)); forward all-gather only if output Replicate, backward all-reduce of dX."""

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        self.input_layouts = input_layouts or Replicate()
        self.output_layouts = output_layouts or Shard(-1)
        self.use_local_output = use_local_output

    def layouts(self, module) -> tuple:
        """(declared input, the input the math needs, output)."""
        return self.input_layouts, Replicate(), self.output_layouts

    def placements(self, module) -> dict:
        if has_own_forward(module):  # as torch: every own parameter on the split dim
            dim = 1 if isinstance(module, nn.Embedding) else 0
            return {name: Shard(dim) for name, p in module._parameters.items() if p is not None}
        return {"weight": Shard(1)} if isinstance(module, nn.Embedding) else {"weight": Shard(0), "bias": Shard(0)}

    def _check_layouts(self, module, where) -> None:
        inputs = (Replicate, Shard, Partial) if isinstance(module, nn.Linear) else (Replicate, Shard)
        _check(where, "input_layouts", self.input_layouts, inputs)
        _check(where, "output_layouts", self.output_layouts, (Replicate, Shard))
        super()._check_layouts(module, where)

    def _apply_fast(self, module, mesh) -> None:
        if isinstance(module, nn.Embedding):
            module.forward = MethodType(_colwise_embedding_forward, module)
            return
        module._dtp_forward = ColumnForward(mesh, module.in_features, module.out_features,
                                            input_layout=self.input_layouts, output_layout=self.output_layouts,
                                            use_local_output=self.use_local_output,
                                            name=f"ColwiseParallel({module._dtp_path!r})")
        module.forward = MethodType(_linear_forward, module)


class RowwiseParallel(_SplitStyle):
    """Split input features (Linear W Shard(1), b Replicate; Embedding: vocab rows); forward all-reduce (or reduce-scatter) of Y."""

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        self.input_layouts = input_layouts
        self.output_layouts = output_layouts or Replicate()
        self.use_local_output = use_local_output

    def layouts(self, module) -> tuple:
        """(declared input, the input the math needs, output)."""
        needed = Replicate() if isinstance(module, nn.Embedding) else Shard(-1)
        return self.input_layouts or needed, needed, self.output_layouts

    def placements(self, module) -> dict:
        if isinstance(module, nn.Embedding):
            return {name: Shard(0) for name, p in module._parameters.items() if p is not None}
        extra = {name: Replicate() for name, p in module._parameters.items() if p is not None}
        return {**extra, "weight": Shard(1), "bias": Replicate()}

    def _check_layouts(self, module, where) -> None:
        embedding = isinstance(module, nn.Embedding)
        _check(where, "input_layouts", self.layouts(module)[0], (Replicate, Shard) if embedding else (Replicate, Shard, Partial))
        _check(where, "output_layouts", self.output_layouts, (Replicate, Shard, Partial))
        if embedding and (module.max_norm is not None or module.sparse):
            raise ValueError(f"{where}: vocab-parallel embeddings support neither max_norm nor sparse gradients")
        super()._check_layouts(module, where)

    def _apply_fast(self, module, mesh) -> None:
        if isinstance(module, nn.Embedding):
            module.forward = MethodType(_vocab_embedding_forward, module)
            return
        module._dtp_forward = RowForward(mesh, module.in_features, input_layout=self.layouts(module)[0],
                                         output_layout=self.output_layouts, use_local_output=self.use_local_output,
                                         name=f"RowwiseParallel({module._dtp_path!r})")
        module.forward = MethodType(_linear_forward, module)


class VocabParallel(RowwiseParallel):
    """nn.Embedding split by vocab rows (Shard(0)); forward all-reduce (Replicate) or reduce-scatter onto Shard(d)."""

    fits = (nn.Embedding,)

    def __init__(self, *, output_layouts: Placement | None = None, use_local_output: bool = True):
        super().__init__(input_layouts=Replicate(), output_layouts=output_layouts, use_local_output=use_local_output)


class SequenceParallel(ParallelStyle):
    """Run the module on sequence shards (Shard(sequence_dim)), parameters replicated with all-reduced gradients; no activation collective."""

    def __init__(self, *, sequence_dim: int = 1, use_local_output: bool = False):
        self.sequence_dim = sequence_dim
        self.use_local_output = use_local_output

    def _apply(self, module, mesh) -> None:
        replicate_parameters_(module, mesh)
        module.forward = MethodType(sequence_parallel_forward, module)


class ReplicateParallel(ParallelStyle):
    """Keep the module whole on every rank: its own plain parameters become replicated DTensors and its forward runs on
    local tensors (no collective); with grad_all_reduce their gradients are summed over tp in backward (for a module
    that sees only this rank's heads, such as Qwen3's q_norm)."""

    def __init__(self, *, grad_all_reduce: bool = False):
        self.grad_all_reduce = grad_all_reduce

    def _apply(self, module, mesh) -> None:
        replicate_own_(module, mesh)
        module.forward = MethodType(_replicate_forward, module)


# -- the forwards the styles install (bound to the module; read its style for the layout) ------

def _linear_forward(self, x):
    return self._dtp_forward(x, self.weight, self.bias)


def _subclass_forward(self, x, *args, **kwargs):
    declared, needed, out = self._dtp_style.layouts(self)
    if isinstance(needed, Shard) and isinstance(x, torch.Tensor):
        needed = Shard(needed.dim % x.dim())
    lookup = isinstance(self, nn.Embedding) and isinstance(self._dtp_style, RowwiseParallel)

    def forward(t):  # a vocab-split embedding's own lookup is reduced at once: see OwnVocabLookup
        with OwnVocabLookup(self.weight, out) if lookup else contextlib.nullcontext():
            return type(self).forward(self, t, *args, **kwargs)
    return dtensor_forward(forward, x, self._dtp_mesh, declared, needed,
                           out, self._dtp_style.use_local_output,
                           where=f"{type(self._dtp_style).__name__}({self._dtp_path!r})")


def _colwise_embedding_forward(self, ids):
    style, mesh = self._dtp_style, self._dtp_mesh
    ids = replicated_ids(ids, mesh, style.input_layouts, f"ColwiseParallel({self._dtp_path!r})")
    out = style.output_layouts
    if isinstance(out, Replicate) or is_last_dim(out, ids.dim() + 1):
        return column_embedding(ids, self.weight, padding_idx=self.padding_idx, gather_output=isinstance(out, Replicate),
                                use_local_output=style.use_local_output)
    y = column_embedding(ids, self.weight, padding_idx=self.padding_idx, use_local_output=False).redistribute(mesh, [out])
    return to_local(y) if style.use_local_output else y


def _vocab_embedding_forward(self, ids):
    style = self._dtp_style
    ids = replicated_ids(ids, self._dtp_mesh, style.layouts(self)[0], f"RowwiseParallel({self._dtp_path!r})")
    return vocab_parallel_embedding(ids, self.weight, padding_idx=self.padding_idx,
                                    output_layout=style.output_layouts, use_local_output=style.use_local_output)


def _replicate_forward(self, *args, **kwargs):
    if self._dtp_style.grad_all_reduce:
        mesh = self._dtp_mesh
        return local_forward(self, args, kwargs, lambda p: replicated_local(p, mesh))
    return local_forward(self, args, kwargs)
