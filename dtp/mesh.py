"""Device meshes: the default 1-D ("tp",) mesh over the default process group, and init_mesh(tp=, dp=)."""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["default_mesh", "init_mesh", "mesh_device_type", "tp_submesh", "check_member", "check_divisible", "common_root"]

# Meshes are cached per default process group (keyed by the group object itself): every layer
# built without an explicit mesh shares one, init_mesh does not create new sub-groups on every
# call, and all is rebuilt after a re-init.
_meshes: list[tuple[object, dict]] = []


def _cache() -> dict:
    world = dist.group.WORLD
    for group, cache in _meshes:
        if group is world:
            return cache
    _meshes.clear()  # the old group was destroyed; its meshes are stale
    _meshes.append((world, {}))
    return _meshes[0][1]


def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "dtp needs an initialised default process group: call "
            "torch.distributed.init_process_group(backend=...) first (gloo for CPU, nccl for GPU)"
        )


def mesh_device_type() -> str:
    """The device type the default process group's backend talks to: gloo -> cpu, nccl -> cuda."""
    _require_process_group()
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend or "xccl" in backend:
        return "cuda" if "nccl" in backend else "xpu"
    return "cpu"


def default_mesh() -> DeviceMesh:
    """The whole default process group as a 1-D mesh named ("tp",); created once and reused."""
    _require_process_group()
    return _named_mesh(mesh_device_type(), (dist.get_world_size(),), ("tp",))


def _named_mesh(device_type: str, shape: tuple, names: tuple) -> DeviceMesh:
    cache = _cache()
    key = (device_type, shape, names)
    if key not in cache:
        cache[key] = init_device_mesh(device_type, shape, mesh_dim_names=names)
    return cache[key]


def init_mesh(tp: int | None = None, dp: int | None = None, *, ep: int | None = None,
              device_type: str | None = None) -> DeviceMesh:
    """A named mesh over the default process group: 1-D ("tp",), or 2-D ("dp", "tp") when dp is given
    or tp is smaller than the world size; with ep, a dtp.mesh_ep.MoeMesh (axes dp, ep, tp, efsdp; ep borrows
    ranks of dp, and of tp when it must).  Sizes are checked (on every rank, before any collective);
    the same sizes give the same mesh object again."""
    _require_process_group()
    world = dist.get_world_size()
    for name, value in (("tp", tp), ("dp", dp), ("ep", ep)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"init_mesh: {name} must be a positive int, got {value!r}")
    if ep is not None and tp is None:
        tp = 1 if dp is None else None
    if tp is None and dp is None:
        tp = world
    elif tp is None:
        if world % dp:
            raise ValueError(f"init_mesh: dp={dp} does not divide the world size {world}")
        tp = world // dp
    elif dp is None and tp != world:
        if world % tp:
            raise ValueError(f"init_mesh: tp={tp} does not divide the world size {world}")
        dp = world // tp
    if (dp or 1) * tp != world:
        raise ValueError(f"init_mesh: dp={dp} x tp={tp} = {(dp or 1) * tp}, but the world size is {world}; "
                         f"the mesh sizes must multiply to the world size")
    device_type = device_type or mesh_device_type()
    if ep is not None:
        from dtp.mesh_ep import init_moe_mesh
        key = (device_type, (world // tp, tp), ("dp", "tp"), ep)
        cache = _cache()
        if key not in cache:
            cache[key] = init_moe_mesh(device_type, world // tp, ep, tp)
        return cache[key]
    if dp is None:
        return _named_mesh(device_type, (tp,), ("tp",))
    return _named_mesh(device_type, (dp, tp), ("dp", "tp"))


def _along(root: DeviceMesh, name: str) -> list:
    """The ranks on root's axis `name` through this rank (no slicing: torch 2.7 records every slice)."""
    dim = root.mesh_dim_names.index(name)
    coords = (root.mesh == dist.get_rank()).nonzero()
    if len(coords) == 0:
        return []
    index = list(coords[0])
    index[dim] = slice(None)
    return root.mesh[tuple(index)].flatten().tolist()


def common_root(meshes: tuple, names: tuple) -> DeviceMesh | None:
    """The one mesh that each of `meshes` was sliced from as its axis of the same name, or None."""
    if all(hasattr(m, "_get_root_mesh") for m in meshes):
        root = meshes[0]._get_root_mesh()
        return root if all(m._get_root_mesh() is root for m in meshes) else None
    from torch.distributed.device_mesh import _mesh_resources  # torch 2.7: its child -> root map keys by value,

    roots = {id(r): r for r in _mesh_resources.child_to_root_mapping.values()}  # so a later equal slice remaps it
    for root in roots.values():
        if set(names) <= set(root.mesh_dim_names or ()) and all(
                _along(root, n) == m.mesh.flatten().tolist() for m, n in zip(meshes, names)):
            return root
    return None


def check_member(mesh: DeviceMesh, what: str) -> None:
    """ValueError naming the mesh and this rank when the mesh does not include this rank (no collective)."""
    if mesh.get_coordinate() is None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise ValueError(f"{what}: this rank ({rank}) is not in the device mesh {mesh} (its ranks: "
                         f"{mesh.mesh.flatten().tolist()}); every rank must pass a mesh it belongs to")


def tp_submesh(mesh: DeviceMesh | None, what: str = "layer") -> DeviceMesh:
    """The 1-D tensor-parallel mesh: mesh itself if 1-D, mesh["tp"] if it has a "tp" axis; else a clear error."""
    if mesh is None:
        return default_mesh()
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"{what}: device_mesh must be a torch DeviceMesh, got {type(mesh).__name__}")
    check_member(mesh, what)
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        raise ValueError(f"{what}: the {mesh.ndim}-D device_mesh has axes {names or 'without names'}; "
                         f"tensor parallelism needs a 1-D mesh or an axis named 'tp'")
    return mesh["tp"]


def check_divisible(what: str, name: str, size: int, world: int) -> None:
    """ValueError naming the dimension, its size and the world size when size % world != 0."""
    if size % world:
        raise ValueError(f"{what}: {name}={size} is not divisible by the world size {world}; "
                         f"{name} must be a multiple of {world}")
