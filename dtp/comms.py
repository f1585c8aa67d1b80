"""Communication report: the collectives a training step issues, predicted from the plan alone and measured.

    report = dtp.comms.predict(model, tokens_shape=(batch, seq), loss_parallel=True)
    print(report)                                   # before running anything big
    measured = dtp.comms.measure(model, ids, loss_fn)
    assert report.signature() == measured.signature()

Each collective: phase (forward/backward), kind (all_reduce / all_gather / reduce_scatter / all_to_all), mesh axis,
element count and bytes ("logical" size: the all-reduced tensor, the gathered output, the scattered
input, padding for uneven shards included; an all-to-all: what this rank sends, -1 where predicted and known
only once the tokens are routed) and, when predicted, the module that issues it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from dtp.comms_ep import predict_experts
from dtp.runtime.collectives import chunk_sizes

__all__ = ["Collective", "CommReport", "predict", "measure"]


@dataclass(frozen=True)
class Collective:
    phase: str
    kind: str
    axis: str
    numel: int
    dtype: torch.dtype = torch.float32
    module: str = ""

    @property
    def bytes(self) -> int:
        return self.numel * torch.empty(0, dtype=self.dtype).element_size()


class CommReport(list):
    """A list of Collective with a table, totals and a signature to compare predictions with measurements."""

    def signature(self) -> Counter:
        """Counter of (phase, kind, numel): what must agree between prediction and measurement."""
        return Counter((c.phase, c.kind, c.numel) for c in self)

    def counts(self) -> Counter:
        return Counter((c.phase, c.kind) for c in self)

    def __str__(self) -> str:
        lines = [f"{'phase':9} {'kind':15} {'axis':4} {'elements':>10} {'bytes':>11}  module"]
        for c in self:
            lines.append(f"{c.phase:9} {c.kind:15} {c.axis:4} {c.numel:10d} {c.bytes:11d}  {c.module}")
        total = sum(c.bytes for c in self)
        lines.append(f"{len(self)} collectives, {total} bytes per step " +
                     ", ".join(f"{k[0]} {k[1]} x{n}" for k, n in sorted(self.counts().items())))
        return "\n".join(lines)


# -- prediction -------------------------------------------------------------------------------------------

def _padded(size: int, world: int) -> int:
    return max(chunk_sizes(size, world)) * world


def _kind(style) -> str:
    """The style's collective pattern by name: a packed style communicates as its unpacked base."""
    return type(style).__name__.removeprefix("Packed") if style is not None else ""


def _is_seq(p) -> bool:
    return isinstance(p, Shard) and p.dim != -1


class _Predictor:
    def __init__(self, model, tokens_shape, dtype, input_requires_grad):
        self.model, self.dtype = model, dtype
        self.tokens = tuple(tokens_shape)
        self.n = math.prod(self.tokens)
        self.grad_flows = input_requires_grad  # becomes True once a module with parameters has run
        self.out = CommReport()

    def emit(self, phase, kind, numel, where, axis="tp", dtype=None):
        self.out.append(Collective(phase, kind, axis, int(numel), dtype or self.dtype, where))

    def seq_numel(self, seq_dim: int, tp: int, width: int) -> int:
        """Element count of a padded all-gather / reduce-scatter of (tokens..., width) over the sequence dim."""
        seq = self.tokens[seq_dim]
        return self.n // max(seq, 1) * _padded(seq, tp) * width

    def module(self, path: str, module: nn.Module):
        style, mesh = getattr(module, "_dtp_style", None), getattr(module, "_dtp_mesh", None)
        name = _kind(style)
        tp = mesh.size() if mesh is not None else 1
        first = not self.grad_flows
        if name in ("ColwiseParallel", "RowwiseParallel", "VocabParallel") and isinstance(module, nn.Linear):
            self.linear(path, module, style, tp, first)
        elif name in ("ColwiseParallel", "RowwiseParallel", "VocabParallel"):
            self.embedding(path, module, style, tp)
        elif name == "PrepareModuleInput":
            self.prepare_input(path, module, style, tp, first)
        elif name in ("ExpertParallel", "ExpertTensorParallel"):
            predict_experts(self, path, module, style)
        if any(True for _ in module.parameters(recurse=False)):
            self.grad_flows = True

    def _managed(self, path: str) -> bool:
        """The parent turns inputs into replicated DTensors: it reduces their gradients, once."""
        parent = self.model.get_submodule(path.rpartition(".")[0]) if "." in path else self.model
        style = getattr(parent, "_dtp_style", None)
        return (_kind(style) == "PrepareModuleInput" and not style.use_local_output
                and style.desired_input_layouts == (Replicate(),))

    def linear(self, path, m, style, tp, first):
        if _kind(style) == "ColwiseParallel":
            if _is_seq(style.input_layouts):
                numel = self.seq_numel(style.input_layouts.dim, tp, m.in_features)
                self.emit("forward", "all_gather", numel, path)
                if not first:
                    self.emit("backward", "reduce_scatter", numel, path)
            elif not first and not self._managed(path):
                self.emit("backward", "all_reduce", self.n * m.in_features, path)
            if isinstance(style.output_layouts, Replicate):
                self.emit("forward", "all_gather", self.n * _padded(m.out_features, tp), path)
            return
        if isinstance(style.output_layouts, Replicate):
            self.emit("forward", "all_reduce", self.n * m.out_features, path)
        else:
            numel = self.seq_numel(style.output_layouts.dim, tp, m.out_features)
            self.emit("forward", "reduce_scatter", numel, path)
            self.emit("backward", "all_gather", numel, path)
        if isinstance(style.layouts(m)[0], Replicate) and not first:
            self.emit("backward", "all_gather", self.n * _padded(m.in_features, tp), path)

    def embedding(self, path, m, style, tp):
        dim = m.embedding_dim
        if _kind(style) == "ColwiseParallel":
            if isinstance(style.output_layouts, Replicate):
                self.emit("forward", "all_gather", self.n * _padded(dim, tp), path)
        elif isinstance(style.output_layouts, Replicate):
            self.emit("forward", "all_reduce", self.n * dim, path)
        else:
            numel = self.seq_numel(style.output_layouts.dim, tp, dim)
            self.emit("forward", "reduce_scatter", numel, path)
            self.emit("backward", "all_gather", numel, path)

    def prepare_input(self, path, m, style, tp, first):
        width = _input_width(m)
        for declared, desired in zip(style.input_layouts or (), style.desired_input_layouts or ()):
            if declared is None or desired is None:
                continue
            if _is_seq(declared) and isinstance(desired, Replicate):
                numel = self.seq_numel(declared.dim, tp, width)
                self.emit("forward", "all_gather", numel, path)
                if not first:
                    self.emit("backward", "reduce_scatter", numel, path)
            elif isinstance(declared, Replicate) and isinstance(desired, Replicate) and not first:
                if not style.use_local_output:
                    self.emit("backward", "all_reduce", self.n * width, path)


def _input_width(module: nn.Module) -> int:
    """Feature width of a module's input: the in_features of its first Linear (attention / MLP blocks)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m.in_features
    raise ValueError("comms.predict: cannot tell the input width of a PrepareModuleInput module without a Linear")


def _fsdp_units(model):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule)]


def _data_parallel(pred: _Predictor, model: nn.Module) -> None:
    """FSDP2 units: all-gather forward; all-gather again (non-root, resharded) and reduce-scatter backward."""
    units = _fsdp_units(model)
    owned = set()
    for path, unit in reversed(units):
        params = [p for p in unit.parameters() if id(p) not in owned]
        owned |= {id(p) for p in params}
        sharded = [p for p in params if isinstance(p, DTensor) and p.device_mesh.mesh_dim_names
                   and "dp" in p.device_mesh.mesh_dim_names]
        if not sharded:
            continue
        dp = sharded[0].device_mesh["dp"].size()
        numel = dp * sum(_fsdp_shard_numel(p, dp) for p in sharded)
        pred.emit("forward", "all_gather", numel, path or "<root>", axis="dp")
        if path:
            pred.emit("backward", "all_gather", numel, path, axis="dp")
        pred.emit("backward", "reduce_scatter", numel, path or "<root>", axis="dp")
    for p in model.parameters():  # gradients averaged DDP-style (TP x DDP, or vectors FSDP keeps whole)
        if getattr(p, "_dtp_dp_averaged", False):
            local = p.to_local() if isinstance(p, DTensor) else p
            pred.emit("backward", "all_reduce", local.numel(), "<ddp>", axis="dp", dtype=p.dtype)


def _fsdp_shard_numel(p: DTensor, dp: int) -> int:
    """FSDP2's padded shard of one parameter: dim 0 of its TP-local shape padded to a multiple of dp."""
    tp_local = list(p.shape)
    for placement, size in zip(p.placements[1:], p.device_mesh.shape[1:]):
        if isinstance(placement, Shard):
            tp_local[placement.dim] = max(chunk_sizes(tp_local[placement.dim], size))
    dim = p.placements[0].dim if isinstance(p.placements[0], Shard) else 0
    rest = math.prod(tp_local) // max(tp_local[dim], 1)
    return -(-tp_local[dim] // dp) * rest


def predict(model: nn.Module, tokens_shape, *, dtype: torch.dtype = torch.float32, loss_parallel: bool = False,
            input_requires_grad: bool = False) -> CommReport:
    """Every collective one training step (forward + backward) of a dtp-parallelized model issues, from its plan alone.

    tokens_shape: the leading (non-feature) dims every activation shares, e.g. (batch,) for an MLP on
    (batch, features) inputs or (batch, seq) for a language model on token ids.  Modules are taken in
    registration order (assumed to be execution order); the first one sees the model input, whose
    gradient is not needed unless input_requires_grad.  loss_parallel adds vocab_parallel_cross_entropy's two.
    """
    pred = _Predictor(model, tokens_shape, dtype, input_requires_grad)
    for path, module in model.named_modules():
        pred.module(path, module)
    if loss_parallel:
        pred.emit("forward", "all_reduce", pred.n, "<loss>", dtype=torch.promote_types(dtype, torch.float32))
        pred.emit("forward", "all_reduce", 3 * pred.n, "<loss>", dtype=torch.promote_types(dtype, torch.float32))
    _data_parallel(pred, model)
    return pred.out


# -- measurement --------------------------------------------------------------------------------------------

class _Recorder(TorchDispatchMode):
    """Records every c10d / functional collective's kind and logical element count."""

    def __init__(self, phase: str, out: CommReport):
        super().__init__()
        self.phase, self.out = phase, out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func).replace("allreduce", "all_reduce").replace("allgather", "all_gather").replace(
            "alltoall", "all_to_all")
        kind = next((k for k in ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")
                     if k in name), None)
        if kind and name.startswith(("c10d.", "_c10d_functional.")):
            self.out.append(Collective(self.phase, kind, "?", _logical_numel(kind, name, args), _dtype(args)))
        return func(*args, **(kwargs or {}))


def _tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def _dtype(args):
    return next(_tensors(args)).dtype


def _logical_numel(kind: str, name: str, args) -> int:
    tensors = list(_tensors(args))
    if name.startswith("_c10d_functional."):  # (input, ..., group_size, name): gathered output = input x size
        return tensors[0].numel() * (args[1] if kind == "all_gather" else 1)
    if kind == "all_reduce":
        return tensors[0].numel()
    if kind == "all_to_all":  # (output, input, ...): what this rank sends
        return tensors[1].numel()
    return max(t.numel() for t in tensors)  # the gathered output / the scattered input


def measure(model: nn.Module, inputs, loss_fn) -> CommReport:
    """Run one training step (model(inputs), loss_fn(output), backward) recording every collective by phase;
    torch's CommDebugMode counts the same step alongside (report.comm_debug_counts)."""
    from torch.distributed.tensor.debug import CommDebugMode

    out = CommReport()
    with CommDebugMode() as debug:
        with _Recorder("forward", out):
            loss = loss_fn(model(inputs))
        with _Recorder("backward", out):
            loss.backward()
    out.comm_debug_counts = Counter({str(op): n for op, n in debug.get_comm_counts().items()})
    return out
