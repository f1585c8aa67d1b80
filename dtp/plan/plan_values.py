"""What a plan value stands for: a dtp style, a torch.distributed.tensor.parallel style or a Hugging Face string."""

from __future__ import annotations

from dtp.plan.hf_plans import hf_style
from dtp.plan.style import ParallelStyle
from dtp.plan.torch_styles import from_torch_style, is_torch_style

__all__ = ["style_of"]


def style_of(value, where: str) -> ParallelStyle | None:
    """The dtp style value stands for (an unknown HF string raises, naming `where`), or None if it is no plan value."""
    if isinstance(value, ParallelStyle):
        return value
    if isinstance(value, str):
        return hf_style(value, where)
    if is_torch_style(value):
        return from_torch_style(value, where)
    return None
