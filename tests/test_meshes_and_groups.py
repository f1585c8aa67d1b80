"""Caches never outlive their process group; a mesh without this rank is a clear error before any collective."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import dtp
from dtp.runtime.collectives import axis_of, group_is_alive

from .reference import assert_close


def case_reinitialised_group():
    """destroy_process_group + init_process_group in one process: equal meshes, fresh groups, layers work."""
    old_default = dtp.default_mesh()
    custom = init_device_mesh("cpu", (1,), mesh_dim_names=("x",))
    old_axis = axis_of(custom)
    torch.manual_seed(0)
    dtp.ColumnParallelLinear(4, 6)(torch.randn(2, 4))
    dist.destroy_process_group()
    assert not group_is_alive(old_axis.group)
    fd, init_file = tempfile.mkstemp(prefix="dtp_reinit_")
    os.close(fd)
    os.unlink(init_file)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    again = init_device_mesh("cpu", (1,), mesh_dim_names=("x",))
    assert again == custom, "DeviceMesh equality ignores the process group: the reason caches must not key on it"
    fresh = axis_of(again)
    assert fresh.group is not old_axis.group and group_is_alive(fresh.group)
    assert dtp.default_mesh() is not old_default
    torch.manual_seed(0)
    reference = nn.Linear(4, 6)
    torch.manual_seed(0)
    layer = dtp.ColumnParallelLinear(4, 6)
    x = torch.randn(2, 4)
    assert_close(layer(x), reference(x), "a layer on the re-initialised group")
    dtp.parallelize_module(nn.Sequential(nn.Linear(4, 4)), None, {"0": dtp.ColwiseParallel()})


def test_caches_follow_a_reinitialised_group(pools):
    pools.run(1, case_reinitialised_group)


def case_mesh_without_this_rank():
    rank = dist.get_rank()
    pair = DeviceMesh("cpu", [0, 1])  # every rank builds it (its groups are made collectively); 2 and 3 are not in it
    square = DeviceMesh("cpu", [[0, 1], [2, 3]], mesh_dim_names=("dp", "tp"))
    if rank < 2:
        dtp.ColumnParallelLinear(4, 4, device_mesh=pair)
        return []
    calls = [
        lambda: dtp.ColumnParallelLinear(4, 4, device_mesh=pair),
        lambda: dtp.parallelize_module(nn.Sequential(nn.Linear(4, 4)), pair, {"0": dtp.ColwiseParallel()}),
        lambda: dtp.replicate_over(nn.Linear(4, 4), pair),
        lambda: dtp.compose.fully_shard(nn.Linear(4, 4), mesh=pair),
    ]
    messages = []
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        assert f"this rank ({rank}) is not in the device mesh" in str(info.value) and "[0, 1]" in str(info.value)
        messages.append(str(info.value).split(":")[0])
    assert square.get_coordinate() is not None  # a mesh that includes every rank is fine
    return messages


def test_a_mesh_without_this_rank_is_a_clear_error(pools):
    results = pools.run(4, case_mesh_without_this_rank)
    assert results[0] == results[1] == []
    assert results[2] == results[3] == ["ColumnParallelLinear", "parallelize_module", "replicate_over", "fully_shard"]
