"""Meshes for expert parallelism: init_mesh(dp=, ep=, tp=) as torchtitan lays them out, ep borrowing ranks of dp.

    ep divides dp            (torchtitan's etp = tp)   root ("efsdp", "ep", "tp"); dp = efsdp x ep
    else ep = n * tp, n | dp (torchtitan's etp = 1, transformers' ep > tp)
                                                       root ("efsdp", "dp_in_ep", "tp"); dp = efsdp x dp_in_ep,
                                                       ep = dp_in_ep x tp (the ranks of a tp group share a batch)

Each axis is one 1-D DeviceMesh over the same root mesh (the flattened ones kept as `_flatten` made them, as
torch asks): `mesh["dp"]` for FSDP2 / data parallel, `mesh["ep"]` for the experts, `mesh["tp"]` for the dense TP
plan, `mesh["efsdp"]` (dp / ep ranks holding the same experts) for FSDP2 on the experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MoeMesh", "init_moe_mesh"]


@dataclass(frozen=True, eq=False)
class MoeMesh:
    """The axes of a dp x tp world with ep borrowed from dp (and tp): each a 1-D DeviceMesh of one root mesh."""

    root: DeviceMesh
    axes: dict

    def __getitem__(self, name: str) -> DeviceMesh:
        if name not in self.axes:
            raise KeyError(f"MoeMesh: no axis {name!r}; it has {sorted(self.axes)}")
        return self.axes[name]

    def size(self, name: str | None = None) -> int:
        return self.root.size() if name is None else self.axes[name].size()

    @property
    def mesh_dim_names(self) -> tuple:
        return tuple(self.axes)

    def __repr__(self) -> str:
        return "MoeMesh(" + ", ".join(f"{n}={m.size()}" for n, m in self.axes.items()) + ")"


def init_moe_mesh(device_type: str, dp: int, ep: int, tp: int) -> MoeMesh:
    """The MoeMesh for dp x tp ranks with ep of them per expert group (checked first: no collective on error)."""
    if dp % ep == 0:
        root = init_device_mesh(device_type, (dp // ep, ep, tp), mesh_dim_names=("efsdp", "ep", "tp"))
        dp_mesh = root["efsdp", "ep"]._flatten("dp")
        return MoeMesh(root, {"dp": dp_mesh, "ep": root["ep"], "tp": root["tp"], "efsdp": root["efsdp"]})
    if ep % tp == 0 and dp % (ep // tp) == 0:
        inner = ep // tp
        root = init_device_mesh(device_type, (dp // inner, inner, tp), mesh_dim_names=("efsdp", "dp_in_ep", "tp"))
        dp_mesh = root["efsdp", "dp_in_ep"]._flatten("dp")
        ep_mesh = root["dp_in_ep", "tp"]._flatten("ep")
        return MoeMesh(root, {"dp": dp_mesh, "ep": ep_mesh, "tp": root["tp"], "efsdp": root["efsdp"]})
    raise ValueError(f"init_mesh: ep={ep} must divide dp={dp} (experts over data-parallel ranks), or be a multiple of "
                     f"tp={tp} whose quotient divides dp (experts over dp and tp ranks)")
