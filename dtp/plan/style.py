"""ParallelStyle: the base of dtp's plan styles (a description of how to split one module) and its checks."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

__all__ = ["ParallelStyle"]


class ParallelStyle:
    """How to split one module: `check` validates (changes nothing), `apply` splits the module in place.

    A module keeps the style it was given (`module._dtp_style`): giving it the same style again (a
    plan applied twice, in several calls) is a no-op, a different one is an error.
    """

    fits: tuple = (nn.Module,)

    def check(self, module: nn.Module, mesh: DeviceMesh, where: str) -> None:
        if not isinstance(module, self.fits):
            names = " or ".join(f"nn.{c.__name__}" for c in self.fits)
            raise TypeError(f"{where}: {type(self).__name__} applies to {names}, but the module is a "
                            f"{type(module).__module__}.{type(module).__name__}")
        previous = getattr(module, "_dtp_style", None)
        if previous is not None and not self.is_applied(module, mesh):
            raise ValueError(f"{where}: the module was already parallelized with {previous!r} on "
                             f"{module._dtp_mesh}; it cannot also take {self!r}")
        for name, param in module.named_parameters(recurse=False):
            if isinstance(param, DTensor) and param.device_mesh != mesh:
                raise ValueError(f"{where}: parameter {name!r} is already a DTensor on another device mesh "
                                 f"({param.device_mesh}, placements {list(param.placements)}); this plan uses {mesh}")
        self._check_layouts(module, where)

    def _check_layouts(self, module, where) -> None:
        pass

    def is_applied(self, module: nn.Module, mesh: DeviceMesh) -> bool:
        """True when module already carries this very style on this mesh (applying it again changes nothing)."""
        return getattr(module, "_dtp_style", None) == self and getattr(module, "_dtp_mesh", None) == mesh

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

    __hash__ = None
