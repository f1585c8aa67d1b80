"""check_replicas: drift between replicated copies and disagreeing shard metadata, named on every rank."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

import dtp


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.LayerNorm(4))


PLAN = {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()}


def case_seeds_and_drift():
    rank = dist.get_rank()
    torch.manual_seed(10 + rank)  # every rank draws its own weights
    messages = []
    ok = dtp.parallelize_module(mlp(), None, PLAN, validate=True)  # src_data_rank=0: rank 0's values everywhere
    with pytest.raises(dtp.ReplicaMismatch) as info:
        dtp.parallelize_module(mlp(), None, PLAN, src_data_rank=None, validate=True)
    assert "'2.bias'" in str(info.value) and "ranks 0 and 1" in str(info.value), str(info.value)
    messages.append(str(info.value))
    opt = torch.optim.SGD(ok.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    out = ok(x)  # every rank runs the forward (its all-reduce); this backward needs no collective
    if rank != 1:  # one rank skips its backward: its replicated bias and norm stop following the others
        out.sum().backward()
    else:
        for p in ok.parameters():
            p.grad = torch.zeros_like(p)
    opt.step()
    with pytest.raises(dtp.ReplicaMismatch) as info:
        dtp.check_replicas(ok)
    assert "'2.bias'" in str(info.value) and "differs between ranks" in str(info.value)
    messages.append(str(info.value))
    return messages


def test_different_seeds_and_drift_are_named_on_every_rank(pools):
    per_rank = pools.run(2, case_seeds_and_drift)
    assert per_rank[0] == per_rank[1]


def case_shard_metadata():
    rank = dist.get_rank()
    torch.manual_seed(0)
    fine = dtp.ColumnParallelLinear(4, 6, validate=True)  # only shards: their metadata agrees
    torch.manual_seed(rank)  # the replicated bias is drawn differently on rank 1
    with pytest.raises(dtp.ReplicaMismatch, match="'bias'.*differs between ranks 0 and 1"):
        dtp.RowParallelLinear(4, 6, validate=True)
    odd = dtp.ColumnParallelLinear(4, 6 if rank == 0 else 8)  # one rank built another shape
    with pytest.raises(dtp.ReplicaMismatch) as info:
        dtp.check_replicas(odd)
    assert "'weight'" in str(info.value) and "[6, 4]" in str(info.value) and "[8, 4]" in str(info.value)
    dtp.check_replicas(fine)
    return str(info.value)


def test_shard_metadata_and_layer_validation(pools):
    per_rank = pools.run(2, case_shard_metadata)
    assert per_rank[0] == per_rank[1]


class WithStrayCopy(nn.Module):
    """A replicated DTensor parameter that differs per rank (made so by hand), which no plan fixes."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        if dist.is_initialized() and dist.get_world_size() > 1:
            mesh = dtp.default_mesh()
            self.scale = nn.Parameter(DTensor.from_local(torch.full((1,), float(dist.get_rank())), mesh, [Replicate()],
                                                         run_check=False))

    def forward(self, x):
        return self.net(x)


def case_verify_reports_replicas():
    torch.manual_seed(0)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    report = dtp.verify(WithStrayCopy, {"net.0": dtp.ColwiseParallel(), "net.2": dtp.RowwiseParallel()}, x, y,
                        nn.functional.mse_loss, modes=("tp",))
    assert not report.ok and "ReplicaMismatch" in report.failures_by_mode["tp"], str(report)
    assert "'scale'" in report.failures_by_mode["tp"]


def test_verify_reports_replicas_that_differ(pools):
    pools.run(2, case_verify_reports_replicas)
