"""dtp: tensor parallelism for PyTorch on DTensor and DeviceMesh, at hand-written speed."""

from .functional import column_linear, row_linear
from .layers import ColumnParallelLinear, RowParallelLinear
from .mesh import default_mesh, init_mesh

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "column_linear",
    "row_linear",
    "default_mesh",
    "init_mesh",
]
