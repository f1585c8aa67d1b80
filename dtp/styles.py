"""Plan styles: small keyword-only objects saying how one module is split, with torch's names and defaults.

    ColwiseParallel   nn.Linear: W Shard(0); in Replicate (or Shard(seq): all-gather); out Shard(-1) (or Replicate: all-gather)
                      nn.Embedding: E Shard(1); out Shard(-1) (or Replicate: all-gather)
    RowwiseParallel   nn.Linear: W Shard(1), b Replicate; in Shard(-1) (or Replicate); out Replicate: all-reduce (or Shard(seq): reduce-scatter)
                      nn.Embedding: vocab parallel, E Shard(0); ids Replicate; out as for nn.Linear
    VocabParallel     nn.Embedding only: the same as RowwiseParallel on an embedding
    SequenceParallel  any module (norms, dropout): runs on sequence shards, parameters replicated
    PrepareModuleInput / PrepareModuleOutput: redistribute a module's inputs / outputs (DTensor semantics)

A module keeps its class, its parameter names and its values (each rank keeps its slice); its
forward is replaced by dtp's, which computes on local shards with the minimum collectives.
"""

from __future__ import annotations

from types import MethodType

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Replicate, Shard

from .embedding import column_embedding, vocab_parallel_embedding
from .prepared import ColumnForward, RowForward
from .params import shard_parameter
from .prepare import prepare_inputs, prepare_outputs
from .replicate import replicate_parameters_
from .sequence import sequence_parallel_forward

__all__ = ["ParallelStyle", "ColwiseParallel", "RowwiseParallel", "VocabParallel", "SequenceParallel",
           "PrepareModuleInput", "PrepareModuleOutput"]


def _is_last(p: Placement) -> bool:
    return isinstance(p, Shard) and p.dim == -1


def _is_token_shard(p: Placement) -> bool:
    return isinstance(p, Shard) and p.dim != -1


class ParallelStyle:
    """A description of how to split one module; `check` validates (no changes), `apply` splits in place."""

    fits: tuple = (nn.Module,)

    def check(self, module: nn.Module, mesh: DeviceMesh, where: str) -> None:
        if not isinstance(module, self.fits):
            names = " or ".join(f"nn.{c.__name__}" for c in self.fits)
            raise TypeError(f"{where}: {type(self).__name__} applies to {names}, but the module is a "
                            f"{type(module).__module__}.{type(module).__name__}")
        self._check_layouts(module, where)

    def _check_layouts(self, module, where) -> None:
        pass

    def apply(self, module: nn.Module, mesh: DeviceMesh, path: str) -> None:
        module._dtp_style, module._dtp_mesh, module._dtp_path = self, mesh, path
        self._apply(module, mesh)

    def _apply(self, module, mesh) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


def _split(module, mesh, weight_placement, bias_placement, forward) -> None:
    """module.weight (and bias) become DTensor parameters holding this rank's slice; forward becomes dtp's."""
    module.weight = shard_parameter(module.weight, mesh, weight_placement)
    if getattr(module, "bias", None) is not None:
        module.bias = shard_parameter(module.bias, mesh, bias_placement)
    module.forward = MethodType(forward, module)


def _bad(where, what, value, allowed):
    return ValueError(f"{where}: {what}={value!r} is not supported here; allowed: {allowed}")


class ColwiseParallel(ParallelStyle):
    """Split output features (Linear W Shard(0), Embedding E Shard(1)); forward all-gather only if output Replicate, backward all-reduce of dX."""

    fits = (nn.Linear, nn.Embedding)

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        self.input_layouts = input_layouts or Replicate()
        self.output_layouts = output_layouts or Shard(-1)
        self.use_local_output = use_local_output

    def _check_layouts(self, module, where) -> None:
        ins = "Replicate() or Shard(d) on a token dim" if isinstance(module, nn.Linear) else "Replicate()"
        if not (isinstance(self.input_layouts, Replicate)
                or (isinstance(module, nn.Linear) and _is_token_shard(self.input_layouts))):
            raise _bad(where, "input_layouts", self.input_layouts, ins)
        if not (isinstance(self.output_layouts, Replicate) or _is_last(self.output_layouts)):
            raise _bad(where, "output_layouts", self.output_layouts, "Shard(-1) or Replicate()")

    def _apply(self, module, mesh) -> None:
        if isinstance(module, nn.Embedding):
            _split(module, mesh, Shard(1), None, _colwise_embedding_forward)
            return
        _split(module, mesh, Shard(0), Shard(0), _linear_forward)
        module._dtp_forward = ColumnForward(mesh, module.out_features,
                                            gather_output=isinstance(self.output_layouts, Replicate),
                                            input_layout=self.input_layouts, use_local_output=self.use_local_output)


class RowwiseParallel(ParallelStyle):
    """Split input features (Linear W Shard(1), b Replicate; Embedding: vocab rows); forward all-reduce (or reduce-scatter) of Y."""

    fits = (nn.Linear, nn.Embedding)

    def __init__(self, *, input_layouts: Placement | None = None, output_layouts: Placement | None = None,
                 use_local_output: bool = True):
        self.input_layouts = input_layouts
        self.output_layouts = output_layouts or Replicate()
        self.use_local_output = use_local_output

    def _input(self, module) -> Placement:
        return self.input_layouts or (Replicate() if isinstance(module, nn.Embedding) else Shard(-1))

    def _check_layouts(self, module, where) -> None:
        allowed = (Replicate(),) if isinstance(module, nn.Embedding) else (Replicate(), Shard(-1))
        if self._input(module) not in allowed:
            raise _bad(where, "input_layouts", self.input_layouts, " or ".join(map(repr, allowed)))
        if not (isinstance(self.output_layouts, Replicate) or _is_token_shard(self.output_layouts)):
            raise _bad(where, "output_layouts", self.output_layouts, "Replicate() or Shard(d) on a token dim")
        if isinstance(module, nn.Embedding) and (module.max_norm is not None or module.sparse):
            raise ValueError(f"{where}: vocab-parallel embeddings support neither max_norm nor sparse gradients")

    def _apply(self, module, mesh) -> None:
        if isinstance(module, nn.Embedding):
            _split(module, mesh, Shard(0), None, _vocab_embedding_forward)
            return
        _split(module, mesh, Shard(1), Replicate(), _linear_forward)
        module._dtp_forward = RowForward(mesh, module.in_features, input_is_parallel=_is_last(self._input(module)),
                                         output_layout=self.output_layouts, use_local_output=self.use_local_output)


class VocabParallel(RowwiseParallel):
    """nn.Embedding split by vocab rows (Shard(0)); forward all-reduce (Replicate) or reduce-scatter onto the sequence (Shard(1))."""

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


class PrepareModuleInput(ParallelStyle):
    """Declare the layouts of a module's inputs and redistribute them to the desired ones (DTensor semantics)."""

    def __init__(self, *, input_layouts=None, desired_input_layouts=None, input_kwarg_layouts=None,
                 desired_input_kwarg_layouts=None, use_local_output: bool = False):
        as_tuple = (lambda v: (v,) if isinstance(v, Placement) else (tuple(v) if v is not None else None))
        self.input_layouts = as_tuple(input_layouts)
        self.desired_input_layouts = as_tuple(desired_input_layouts)
        self.input_kwarg_layouts = dict(input_kwarg_layouts or {})
        self.desired_input_kwarg_layouts = dict(desired_input_kwarg_layouts or {})
        self.use_local_output = use_local_output
        if (self.input_layouts is None) != (self.desired_input_layouts is None) or (
                self.input_layouts is not None and len(self.input_layouts) != len(self.desired_input_layouts)):
            raise ValueError(f"PrepareModuleInput: input_layouts {self.input_layouts} and desired_input_layouts "
                             f"{self.desired_input_layouts} must have the same length")
        if set(self.input_kwarg_layouts) != set(self.desired_input_kwarg_layouts):
            raise ValueError("PrepareModuleInput: input_kwarg_layouts and desired_input_kwarg_layouts must name "
                             "the same keyword arguments")

    def _apply(self, module, mesh) -> None:
        module.register_forward_pre_hook(lambda mod, args, kwargs: prepare_inputs(mod, args, kwargs),
                                         with_kwargs=True)


class PrepareModuleOutput(ParallelStyle):
    """Declare the layouts of a module's outputs and redistribute them to the desired ones (DTensor semantics)."""

    def __init__(self, *, output_layouts, desired_output_layouts, use_local_output: bool = True):
        as_tuple = (lambda v: (v,) if isinstance(v, Placement) else tuple(v))
        self.output_layouts = as_tuple(output_layouts)
        self.desired_output_layouts = as_tuple(desired_output_layouts)
        self.use_local_output = use_local_output
        if len(self.output_layouts) != len(self.desired_output_layouts):
            raise ValueError(f"PrepareModuleOutput: output_layouts {self.output_layouts} and desired_output_layouts "
                             f"{self.desired_output_layouts} must have the same length")

    def _apply(self, module, mesh) -> None:
        module.register_forward_hook(lambda mod, args, out: prepare_outputs(mod, out))


# -- the forwards the styles install (bound to the module; read its style for the layout) ------

def _linear_forward(self, x):
    return self._dtp_forward(x, self.weight, self.bias)


def _colwise_embedding_forward(self, ids):
    style = self._dtp_style
    return column_embedding(ids, self.weight, padding_idx=self.padding_idx,
                            gather_output=isinstance(style.output_layouts, Replicate),
                            use_local_output=style.use_local_output)


def _vocab_embedding_forward(self, ids):
    style = self._dtp_style
    return vocab_parallel_embedding(ids, self.weight, padding_idx=self.padding_idx,
                                    output_layout=style.output_layouts, use_local_output=style.use_local_output)
