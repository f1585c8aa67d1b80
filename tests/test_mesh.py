"""dtp.mesh: the default 1-D mesh and init_mesh's named 1-D / 2-D meshes and their errors."""

import pytest
import torch.distributed as dist

import dtp

from .reference import expect_errors


def case_default_mesh():
    mesh = dtp.default_mesh()
    assert mesh is dtp.default_mesh(), "the default mesh is created once and reused"
    assert mesh.ndim == 1 and mesh.mesh_dim_names == ("tp",) and mesh.size() == dist.get_world_size()
    assert mesh.device_type == "cpu"  # gloo
    assert dtp.init_mesh() is mesh
    return mesh.get_local_rank()


@pytest.mark.parametrize("world", [1, 3])
def test_default_mesh(pools, world):
    assert pools.run(world, case_default_mesh) == list(range(world))


def case_2d_mesh():
    for kwargs in (dict(tp=2, dp=2), dict(tp=2), dict(dp=2)):
        mesh = dtp.init_mesh(**kwargs)
        assert mesh.mesh_dim_names == ("dp", "tp") and tuple(mesh.shape) == (2, 2), kwargs
    mesh = dtp.init_mesh(tp=2, dp=2)
    return mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()


def test_2d_mesh(pools):
    assert pools.run(4, case_2d_mesh) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def case_mesh_errors():
    return expect_errors([(ValueError, lambda kw=kwargs: dtp.init_mesh(**kw), needles) for kwargs, needles in (
        (dict(tp=3), ["tp=3", "world size 4"]), (dict(dp=3), ["dp=3", "world size 4"]),
        (dict(tp=2, dp=3), ["dp=3 x tp=2 = 6", "world size is 4"]), (dict(tp=0), ["tp must be a positive int"]))])


def test_mesh_size_errors_on_every_rank(pools):
    per_rank = pools.run(4, case_mesh_errors)
    assert all(m == per_rank[0] for m in per_rank)


def test_mesh_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        dtp.default_mesh()
