"""Column- and row-parallel Linear layers and the vocab-parallel embedding, whose parameters are DTensors on a 1-D
tensor-parallel mesh."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from dtp.ops.embedding import vocab_parallel_embedding
from dtp.ops.linear import ColumnForward, RowForward
from dtp.mesh import tp_submesh
from dtp.ops.packed import PackedLayout, PackedOutput, mark_packed, resolve_blocks
from dtp.runtime.sharding import broadcast_from, local_slice, shard_parameter
from dtp.replica_check import check_replicas

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding"]


def _check_features(cls_name: str, in_features, out_features) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{cls_name}: {name} must be a positive int, got {value!r}")


def _check_master_weight(cls_name: str, master_weight, out_features: int, in_features: int) -> torch.Tensor:
    """The full weight, checked: a plain floating tensor of shape (out_features, in_features)."""
    if isinstance(master_weight, DTensor) or not isinstance(master_weight, torch.Tensor):
        raise TypeError(f"{cls_name}: master_weight must be a plain torch.Tensor of shape "
                        f"({out_features}, {in_features}), got {type(master_weight).__name__}")
    if master_weight.dim() != 2:
        raise ValueError(f"{cls_name}: master_weight must be 2-D (out_features, in_features) = "
                         f"({out_features}, {in_features}), got {master_weight.dim()}-D shape {tuple(master_weight.shape)}")
    if tuple(master_weight.shape) != (out_features, in_features):
        raise ValueError(f"{cls_name}: master_weight has shape {tuple(master_weight.shape)}, expected "
                         f"(out_features, in_features) = ({out_features}, {in_features})")
    if not master_weight.is_floating_point():
        raise TypeError(f"{cls_name}: master_weight must be floating point, got {master_weight.dtype}")
    return master_weight.detach()


def linear_init_(weight: torch.Tensor, bias: torch.Tensor | None, generator=None) -> None:
    """Fill a full weight/bias with the very calls nn.Linear.reset_parameters makes (same values per seed)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if bias is not None:
        fan_in = weight.shape[1]
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        nn.init.uniform_(bias, -bound, bound, generator=generator)


def _draw_like_linear(out_features: int, in_features: int, bias: bool, device, dtype):
    """Full weight and bias as nn.Linear(in_features, out_features) would draw them (uninitialised on meta)."""
    full_w = torch.empty(out_features, in_features, device=device, dtype=dtype)
    full_b = torch.empty(out_features, device=device, dtype=dtype) if bias else None
    if full_w.device.type != "meta":
        linear_init_(full_w, full_b)
    return full_w, full_b


class _ParallelLinear(nn.Module):
    """Shared construction: mesh, full-weight init (like nn.Linear), local slicing into DTensor params."""

    weight_placement: Placement
    bias_placement: Placement

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device_mesh: DeviceMesh | None = None, master_weight: torch.Tensor | None = None,
                 use_local_output: bool = True, device=None, dtype=None, validate: bool = False, blocks=None):
        super().__init__()
        name = type(self).__name__
        _check_features(name, in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.device_mesh = tp_submesh(device_mesh, name)
        self._packed = None  # a PackedLayout when the output features are packed blocks (ColumnParallelLinear(blocks=))
        if blocks is not None:
            sizes = resolve_blocks(blocks, out_features, self.device_mesh.size(), f"{name}(blocks=...)")
            self._packed = PackedLayout(sizes, 0, self.device_mesh.size())
        self.use_local_output = use_local_output
        if master_weight is not None:
            master_weight = _check_master_weight(name, master_weight, out_features, in_features)
            device = device if device is not None else master_weight.device
            dtype = dtype if dtype is not None else master_weight.dtype
        device = torch.device(device) if device is not None else torch.device(self.device_mesh.device_type)
        if master_weight is not None:  # sliced directly: each rank copies only its part
            full_w = master_weight.to(device=device, dtype=dtype)
            full_b = torch.zeros(out_features, device=device, dtype=dtype) if bias else None
        else:
            full_w, full_b = _draw_like_linear(out_features, in_features, bias, device, dtype)
        self.weight = shard_parameter(self._arrange(full_w), self.device_mesh, self.weight_placement)
        self.bias = shard_parameter(self._arrange(full_b), self.device_mesh, self.bias_placement) if bias else None
        if self._packed is not None:
            for param_name in ("weight", "bias") if bias else ("weight",):
                mark_packed(self, param_name, self._packed)
        self._validate = validate  # checked once the subclass is built (dtp.check_replicas, one all_gather_object)

    @classmethod
    def from_linear(cls, linear: nn.Linear, device_mesh: DeviceMesh | None = None, *, src_data_rank: int | None = 0,
                    **kwargs):
        """A parallel copy of an nn.Linear: each rank keeps its slice of linear's weight and bias, taken from mesh
        rank src_data_rank (one broadcast per tensor, as torch's parallelize_module) or, with None, its own."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear expects an nn.Linear, got {type(linear).__name__}")
        if type(linear).forward is not nn.Linear.forward:
            raise TypeError(f"{cls.__name__}.from_linear: {type(linear).__module__}.{type(linear).__name__} has its own "
                            f"forward, which a copy of its weights would drop; parallelize it with a plan instead")
        full_w = linear.weight.detach()
        full_b = linear.bias.detach() if linear.bias is not None else None
        mesh = tp_submesh(device_mesh, cls.__name__)
        if src_data_rank is not None:  # copies: the nn.Linear given is left as it was
            full_w, full_b = full_w.clone(), (full_b.clone() if full_b is not None else None)
            broadcast_from([t for t in (full_w, full_b) if t is not None], mesh, src_data_rank)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device_mesh=mesh,
                    master_weight=full_w, **kwargs)
        if full_b is not None:
            layer.load_full_bias_(full_b)
        layer.weight.requires_grad_(linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer

    def _arrange(self, full):
        """A full tensor in the order its Shard(0) splits: the packed order for packed blocks, else itself."""
        return full if self._packed is None or full is None else self._packed.pack(full)

    @torch.no_grad()
    def load_full_bias_(self, full_bias: torch.Tensor) -> None:
        """Copy this rank's slice of a full (out_features,) bias into the parameter."""
        mesh = self.device_mesh
        self.bias._local_tensor.copy_(local_slice(self._arrange(full_bias.detach()), self.bias_placement, mesh.size(),
                                                  mesh.get_local_rank()))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Redraw like nn.Linear (the same full values for the same seed) and keep this rank's slice."""
        w = self.weight._local_tensor
        full_w, full_b = _draw_like_linear(self.out_features, self.in_features, self.bias is not None, w.device, w.dtype)
        mesh = self.device_mesh
        w.copy_(local_slice(self._arrange(full_w), self.weight_placement, mesh.size(), mesh.get_local_rank()))
        if full_b is not None:
            self.load_full_bias_(full_b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"tp={self.device_mesh.size()}, {self._layout_repr()}")


class ColumnParallelLinear(_ParallelLinear):
    """Y = X Wᵀ + b, W and b split by output features (Shard(0)); forward all-gather of Y if gather_output, backward all-reduce of dX.

    `input_layout=Shard(1)` (sequence parallel) all-gathers X in the forward and reduce-scatters
    dX in the backward instead.  With `gather_output=False` the output stays sharded on its last
    dim (no collective), ready for a RowParallelLinear.

    `blocks=` packs the output features (nanoGPT's c_attn = [q, k, v]: `blocks=3`; GQA: `blocks=(q, kv, kv)` sizes;
    see dtp.ops.packed): rank r holds W_r = cat_i chunk_r(W_i) and b likewise, so its output slice is [q_r, k_r, v_r]
    with the same collectives; a gathered output is put back in block order locally.  `.weight` is then a Shard(0)
    DTensor of the packed order; dtp.full_state_dict and checkpoints give and take the original layout.
    """

    weight_placement = Shard(0)
    bias_placement = Shard(0)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, gather_output: bool = True,
                 input_layout: Placement | None = None, blocks=None, **kwargs):
        if blocks is not None and not gather_output and not kwargs.get("use_local_output", True):
            raise ValueError("ColumnParallelLinear: blocks= with gather_output=False and use_local_output=False cannot "
                             "be honoured: the packed local output [q_r, k_r, v_r] is no torch placement of the full "
                             "output (use use_local_output=True, or gather_output=True)")
        super().__init__(in_features, out_features, bias, blocks=blocks, **kwargs)
        self.gather_output = gather_output
        self.input_layout = input_layout or Replicate()
        self._forward = ColumnForward(self.device_mesh, in_features, out_features, input_layout=self.input_layout,
                                      output_layout=Replicate() if gather_output else Shard(-1),
                                      use_local_output=self.use_local_output, name=type(self).__name__)
        if self._packed is not None and gather_output:
            self._forward = PackedOutput(self._forward, self._packed)
        if self._validate:
            check_replicas(self)

    def forward(self, x):
        return self._forward(x, self.weight, self.bias)

    def _layout_repr(self) -> str:
        packed = f", blocks={list(self._packed.blocks)}" if self._packed is not None else ""
        return f"input_layout={self.input_layout}, gather_output={self.gather_output}{packed}"


class RowParallelLinear(_ParallelLinear):
    """Y = Σ_ranks X_r W_rᵀ + b, W split by input features (Shard(1)), b replicated; forward all-reduce of Y (reduce-scatter for output_layout=Shard(d)).

    With `input_is_parallel=True` X is this rank's slice of the last dim (as a ColumnParallelLinear
    with gather_output=False produces); otherwise X is full and sliced locally (no collective).
    """

    weight_placement = Shard(1)
    bias_placement = Replicate()

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, input_is_parallel: bool = False,
                 output_layout: Placement | None = None, **kwargs):
        if kwargs.get("blocks") is not None:
            raise TypeError("RowParallelLinear: blocks= is not supported (packed input features): use "
                            "dtp.PackedRowwiseParallel(blocks=...) in a plan")
        super().__init__(in_features, out_features, bias, **kwargs)
        self.input_is_parallel = input_is_parallel
        self.output_layout = output_layout or Replicate()
        self._forward = RowForward(self.device_mesh, in_features,
                                   input_layout=Shard(-1) if input_is_parallel else Replicate(),
                                   output_layout=self.output_layout, use_local_output=self.use_local_output,
                                   name=type(self).__name__)
        if self._validate:
            check_replicas(self)

    def forward(self, x):
        return self._forward(x, self.weight, self.bias)

    def _layout_repr(self) -> str:
        return f"input_is_parallel={self.input_is_parallel}, output_layout={self.output_layout}"


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows split over the vocab (Shard(0)); forward all-reduce (or reduce-scatter onto Shard(1))."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 device_mesh: DeviceMesh | None = None, output_layout: Placement | None = None,
                 use_local_output: bool = True, _weight: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        # the full table drawn as nn.Embedding draws it (same values per seed), then sliced locally
        full = nn.Embedding(num_embeddings, embedding_dim, padding_idx, _weight=_weight, device=device, dtype=dtype)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, full.padding_idx
        self.device_mesh = tp_submesh(device_mesh, "VocabParallelEmbedding")
        self.output_layout = output_layout or Replicate()
        self.use_local_output = use_local_output
        self.weight = shard_parameter(full.weight, self.device_mesh, Shard(0))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, device_mesh: DeviceMesh | None = None, **kwargs):
        """A vocab-parallel copy of an nn.Embedding: each rank keeps its rows."""
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                   device_mesh=device_mesh, _weight=embedding.weight.detach(), **kwargs)

    def forward(self, ids):
        return vocab_parallel_embedding(ids, self.weight, padding_idx=self.padding_idx,
                                        output_layout=self.output_layout, use_local_output=self.use_local_output)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"tp={self.device_mesh.size()}, output_layout={self.output_layout}")
