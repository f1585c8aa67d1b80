"""torch.distributed.tensor.parallel's style objects in a dtp plan: each becomes the dtp style with the same layouts.

Code written for torch's TP then needs only `parallelize_module` swapped.  A torch style dtp knows
(ColwiseParallel, RowwiseParallel, SequenceParallel, PrepareModuleInput, PrepareModuleOutput,
PrepareModuleInputOutput) is read through its attributes (torch 2.7 and newer); an option dtp cannot
honour is an error naming the plan entry and the option.  Any other torch ParallelStyle (a subclass,
a project's own style) is applied by torch itself, with torch's semantics.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from dtp.plan.module_io import PrepareModuleInput, PrepareModuleInputOutput, PrepareModuleOutput
from dtp.plan.style import ParallelStyle
from dtp.plan.styles import ColwiseParallel, RowwiseParallel, SequenceParallel

__all__ = ["from_torch_style", "TorchStyle", "is_torch_style"]


def _torch_tp():
    import torch.distributed.tensor.parallel as torch_tp

    return torch_tp


def is_torch_style(value) -> bool:
    """value is a torch.distributed.tensor.parallel ParallelStyle."""
    return isinstance(value, _torch_tp().ParallelStyle)


class TorchStyle(ParallelStyle):
    """A torch ParallelStyle dtp has no equivalent for, applied by torch itself (its hooks, DTensor semantics)."""

    def __init__(self, style):
        self.style = style

    def _apply(self, module, mesh) -> None:
        # torch distributes plain tensors: parameters dtp replicated in an earlier call go back to their local tensor
        for sub in module.modules():
            if hasattr(sub, "_dtp_style") and sub is not module:
                continue
            for name, param in list(sub._parameters.items()):
                if isinstance(param, DTensor) and param.placements == (Replicate(),):
                    sub._parameters[name] = nn.Parameter(param._local_tensor, requires_grad=param.requires_grad)
        self.style._apply(module, mesh)


def _only(style, where: str, known: set) -> None:
    extra = sorted(k for k in vars(style) if k not in known and not k.startswith("_"))
    if extra:
        raise ValueError(f"{where}: torch's {type(style).__name__} has option(s) {extra} that dtp cannot honour "
                         f"(dtp reads {sorted(known)})")


def _one(style, attr: str, where: str):
    value = getattr(style, attr)
    if value is None:
        return None
    if len(value) != 1:
        raise ValueError(f"{where}: torch's {type(style).__name__}.{attr}={value!r} cannot be honoured: dtp takes "
                         f"one placement on a 1-D mesh")
    return value[0]


def _prepare_input(style, where: str) -> PrepareModuleInput:
    _only(style, where, {"input_layouts", "desired_input_layouts", "input_kwarg_layouts",
                         "desired_input_kwarg_layouts", "use_local_output", "with_kwargs", "src_data_rank"})
    return PrepareModuleInput(input_layouts=style.input_layouts, desired_input_layouts=style.desired_input_layouts,
                              input_kwarg_layouts=style.input_kwarg_layouts,
                              desired_input_kwarg_layouts=style.desired_input_kwarg_layouts,
                              use_local_output=style.use_local_output)


def _prepare_output(style, where: str) -> PrepareModuleOutput:
    _only(style, where, {"output_layouts", "desired_output_layouts", "use_local_output", "src_data_rank"})
    return PrepareModuleOutput(output_layouts=style.output_layouts, desired_output_layouts=style.desired_output_layouts,
                               use_local_output=style.use_local_output)


def from_torch_style(style, where: str) -> ParallelStyle:
    """The dtp style with the same layouts as torch's `style` (or TorchStyle(style) for a style dtp does not know)."""
    tp = _torch_tp()
    kind = type(style)
    if kind is tp.ColwiseParallel or kind is tp.RowwiseParallel:
        _only(style, where, {"input_layouts", "output_layouts", "desired_input_layouts", "use_local_output",
                             "src_data_rank"})
        if kind is tp.ColwiseParallel and tuple(getattr(style, "desired_input_layouts", (Replicate(),))) != (Replicate(),):
            raise ValueError(f"{where}: torch's ColwiseParallel.desired_input_layouts={style.desired_input_layouts} "
                             f"cannot be honoured: a column-parallel layer needs its input whole (Replicate)")
        dtp_kind = ColwiseParallel if kind is tp.ColwiseParallel else RowwiseParallel
        return dtp_kind(input_layouts=_one(style, "input_layouts", where),
                        output_layouts=_one(style, "output_layouts", where), use_local_output=style.use_local_output)
    if kind is tp.SequenceParallel:
        _only(style, where, {"sequence_sharding", "use_local_output", "src_data_rank"})
        return SequenceParallel(sequence_dim=_one(style, "sequence_sharding", where).dim,
                                use_local_output=style.use_local_output)
    if kind is tp.PrepareModuleInput:
        return _prepare_input(style, where)
    if kind is tp.PrepareModuleOutput:
        return _prepare_output(style, where)
    if kind is getattr(tp, "PrepareModuleInputOutput", None):
        _only(style, where, {"prepare_module_input", "prepare_module_output", "src_data_rank"})
        inputs, outputs = _prepare_input(style.prepare_module_input, where), _prepare_output(style.prepare_module_output, where)
        return PrepareModuleInputOutput(
            input_layouts=inputs.input_layouts, desired_input_layouts=inputs.desired_input_layouts,
            input_kwarg_layouts=inputs.input_kwarg_layouts, desired_input_kwarg_layouts=inputs.desired_input_kwarg_layouts,
            use_local_input=inputs.use_local_output, output_layouts=outputs.output_layouts,
            desired_output_layouts=outputs.desired_output_layouts, use_local_output=outputs.use_local_output)
    return TorchStyle(style)
