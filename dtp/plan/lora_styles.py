"""A peft LoRA layer split as its base layer's plan entry says (peft found by duck typing, never imported).

    entry on the LoRA layer            base_layer   lora_A (r x in)                 lora_B (out x r)
    ColwiseParallel (Packed too)       the entry    whole, ReplicateParallel        the entry: rows, Shard(0)
    RowwiseParallel (Packed too)       the entry    the entry: columns, Shard(1)    whole, ReplicateParallel
    ReplicateParallel                  the entry    the entry                       the entry
    an embedding entry, out Replicate  the entry    lora_embedding_A / _B whole, read locally (no collective)

Column: Y_r = X W_r^T + s (X A^T) B_r^T, this rank's out features of both terms; lora_B's backward all-reduces
d(X A^T) as the base layer's does dX, each once.  Row: Y = all_reduce(X_r W_r^T) + s all_reduce(X_r A_r^T) B^T;
the adapter's partial sum is reduced by lora_A (r features wide, not the output's width), so each sum is reduced
exactly once and B runs on the reduced product on every rank.  A sequence-sharded input (column) or output (row)
leaves the whole factor on a shard: its gradient is then all-reduced (ReplicateParallel(grad_all_reduce=True)).
"""

from __future__ import annotations

from types import MethodType

from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from dtp.ops.local_forward import local_parameters
from dtp.plan.replicated import replicate_own_
from dtp.plan.style import ParallelStyle
from dtp.plan.styles import ColwiseParallel, ReplicateParallel, RowwiseParallel
from dtp.runtime.conversions import to_local

__all__ = ["LoraLayerParallel", "is_adapter_layer", "has_class", "join", "lora_entries"]

ADAPTER_DICTS = ("lora_A", "lora_B")  # a module added to one of these after the split is refused (dtp.plan.adapters)
EMBEDDING_DICTS = ("lora_embedding_A", "lora_embedding_B")
SUPPORTED = "vanilla LoRA (peft.tuners.lora Linear on an nn.Linear, Embedding on an nn.Embedding)"


def join(path: str, name: str) -> str:
    """The path of `name` under the module at path ("" is the root)."""
    return f"{path}.{name}" if path else name


def has_class(module: nn.Module, name: str) -> bool:
    """module's class or one of its bases is named `name` (peft's classes, recognised without importing peft)."""
    return any(c.__name__ == name for c in type(module).__mro__)


def is_adapter_layer(module: nn.Module) -> bool:
    """A peft tuner layer: a module wrapping its original as the submodule `base_layer`."""
    return isinstance(module._modules.get("base_layer"), nn.Module) and (
        has_class(module, "BaseTunerLayer") or isinstance(module._modules.get("lora_A"), nn.ModuleDict))


def _dict(layer: nn.Module, name: str) -> dict:
    d = layer._modules.get(name)
    return dict(d.items()) if isinstance(d, (nn.ModuleDict, nn.ParameterDict)) else {}


def lora_kind(layer: nn.Module) -> tuple[str | None, str]:
    """("linear" | "embedding", "") for a LoRA layer dtp can split by its base's entry, else (None, the reason)."""
    base = layer._modules["base_layer"]
    what = f"a {type(layer).__module__}.{type(layer).__name__} around a {type(base).__name__}"
    if has_class(layer, "ParamWrapper"):
        return None, f"{what}: LoRA on parameters (peft's target_parameters, as 'all-linear' puts on fused MoE experts)"
    if is_adapter_layer(base):
        return None, f"{what} that is itself an adapter layer"
    variants = sorted(getattr(layer, "lora_variant", None) or {}) or sorted(_dict(layer, "lora_magnitude_vector"))
    if variants:
        return None, f"{what} whose adapters {variants} are LoRA variants (DoRA, aLoRA, ...), not vanilla LoRA"
    if getattr(layer, "fan_in_fan_out", False):
        return None, f"{what} with fan_in_fan_out=True"
    a, b, ea, eb = (_dict(layer, n) for n in ADAPTER_DICTS + EMBEDDING_DICTS)
    if (type(layer).__name__ == "Linear" and isinstance(base, nn.Linear) and a and a.keys() == b.keys() and not ea
            and all(isinstance(m, nn.Linear) for m in (*a.values(), *b.values()))):
        return "linear", ""
    if (type(layer).__name__ == "Embedding" and isinstance(base, nn.Embedding) and ea and ea.keys() == eb.keys()
            and not a):
        return "embedding", ""
    return None, what


def lora_entries(path: str, layer: nn.Module, style: ParallelStyle, where: str) -> dict:
    """{path: style} for the LoRA layer at path and its parts, split as its base layer's entry `style` says."""
    kind, why = lora_kind(layer)
    if kind is None:
        raise ValueError(f"{where}: dtp cannot split {why}; it splits {SUPPORTED}. Leave this layer out of the "
                         f"adapter (name its target_modules, e.g. the attention projections), or write the plan for "
                         f"its parts yourself")
    base = {join(path, "base_layer"): style}
    if kind == "embedding":
        if not (isinstance(style, (ColwiseParallel, RowwiseParallel, ReplicateParallel))
                and isinstance(getattr(style, "output_layouts", Replicate()), Replicate)
                and isinstance(getattr(style, "input_layouts", None) or Replicate(), Replicate)
                and getattr(style, "use_local_output", True) and not getattr(style, "grad_all_reduce", False)):
            raise ValueError(f"{where}: a LoRA embedding is supported under an embedding entry with replicated ids "
                             f"and a replicated local output (embedding_rowwise, embedding_colwise, replicate), not "
                             f"{style!r}")
        return {path: LoraLayerParallel(embedding=True), **base}
    names = list(layer.lora_A.keys())
    if isinstance(style, ReplicateParallel):
        split_a = split_b = style
    elif isinstance(style, ColwiseParallel):
        inputs = style.input_layouts
        if not (isinstance(inputs, Replicate) or (isinstance(inputs, Shard) and inputs.dim >= 0)):
            raise ValueError(f"{where}: under LoRA a column split needs a replicated or sequence-sharded input "
                             f"(Shard(d), d >= 0), not input_layouts={inputs!r}: lora_A reads the input whole")
        split_a, split_b = ReplicateParallel(grad_all_reduce=not isinstance(inputs, Replicate)), style
    elif isinstance(style, RowwiseParallel):
        out = style.output_layouts
        if not isinstance(out, (Replicate, Shard)) or not style.use_local_output:
            raise ValueError(f"{where}: under LoRA a row split needs a reduced output (Replicate or Shard(d)) as a "
                             f"local tensor, not output_layouts={out!r}, use_local_output={style.use_local_output}")
        split_a, split_b = style, ReplicateParallel(grad_all_reduce=not isinstance(out, Replicate))
    else:
        raise ValueError(f"{where}: {type(style).__name__} has no LoRA counterpart; a LoRA layer's entry may be a "
                         f"column or row split, a replicate or a module input/output layout")
    entries = {path: LoraLayerParallel(), **base}
    entries.update({join(path, f"lora_A.{name}"): split_a for name in names})
    entries.update({join(path, f"lora_B.{name}"): split_b for name in names})
    return entries


class LoraLayerParallel(ParallelStyle):
    """The LoRA layer itself, its parts split by their own entries: its adapter dicts are marked (an adapter added
    later is refused); for an embedding, lora_embedding_A / _B become replicated DTensors read locally (no
    collective)."""

    def __init__(self, *, embedding: bool = False):
        self.embedding = embedding

    def _apply(self, module, mesh) -> None:
        for name in ADAPTER_DICTS:
            if isinstance(module._modules.get(name), nn.Module):
                module._modules[name]._dtp_adapters_of = module._dtp_path
        if self.embedding:
            for name in EMBEDDING_DICTS:
                replicate_own_(module._modules[name], mesh)
            module.forward = MethodType(_lora_embedding_forward, module)
            module._get_embed_scale = MethodType(_local_embed_scale, module)


def _lora_embedding_forward(self, x, *args, **kwargs):
    """peft's own LoRA embedding forward: the base layer's split forward, the adapter on local replicated factors."""
    dicts = [self._modules[name] for name in EMBEDDING_DICTS]
    late = [name for d in dicts for name, p in d._parameters.items() if not isinstance(p, DTensor)]
    if late:
        raise ValueError(f"LoRA embedding {self._dtp_path!r}: adapter {late[0]!r} was added after "
                         f"dtp.parallelize_module split this layer; add every adapter before parallelizing")
    with local_parameters(dicts[0], to_local, recurse=False), local_parameters(dicts[1], to_local, recurse=False):
        return type(self).forward(self, x, *args, **kwargs)


def _local_embed_scale(self):
    """peft's embed_scale of the base layer (Gemma's scaled embeddings), local where the split made it a DTensor."""
    scale = type(self)._get_embed_scale(self)
    return scale.to_local() if isinstance(scale, DTensor) else scale
