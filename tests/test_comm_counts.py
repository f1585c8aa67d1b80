"""Collective counts with torch's CommDebugMode: each layout issues Megatron's minimum and nothing more."""

import torch
from torch.distributed.tensor import Shard

import dtp
import parallel_linear as pl

from .reference import count_collectives


def case_counts():
    torch.manual_seed(0)
    results = {}
    x = torch.randn(4, 8, requires_grad=True)

    col = dtp.ColumnParallelLinear(8, 16)
    y, results["column gathered fwd"] = count_collectives(lambda: col(x))
    _, results["column gathered bwd"] = count_collectives(lambda: y.sum().backward())

    row = dtp.RowParallelLinear(16, 8, input_is_parallel=True)
    h = torch.randn(4, 16 // 2, requires_grad=True)
    y, results["row fwd"] = count_collectives(lambda: row(h))
    _, results["row bwd"] = count_collectives(lambda: y.sum().backward())

    up = dtp.ColumnParallelLinear(8, 16, gather_output=False)
    down = dtp.RowParallelLinear(16, 8, input_is_parallel=True)
    y, results["pair fwd"] = count_collectives(lambda: down(up(x)))
    _, results["pair bwd"] = count_collectives(lambda: y.sum().backward())

    shim = pl.ColumnParallelLinear(8, 16, True, None)
    y, results["shim column fwd"] = count_collectives(lambda: shim(x))
    shim_row = pl.RowParallelLinear(16, 8, True, None)
    y, results["shim row fwd"] = count_collectives(lambda: shim_row(h))

    sp_up = dtp.ColumnParallelLinear(8, 16, gather_output=False, input_layout=Shard(0))
    sp_down = dtp.RowParallelLinear(16, 8, input_is_parallel=True, output_layout=Shard(0))
    xs = torch.randn(2, 8, requires_grad=True)
    sp_down(sp_up(xs)).sum().backward()  # a plain Shard(0) input's first call also learns every rank's length
    y, results["sp pair fwd"] = count_collectives(lambda: sp_down(sp_up(xs)))
    _, results["sp pair bwd"] = count_collectives(lambda: y.sum().backward())
    return {k: dict(v) for k, v in results.items()}


EXPECTED = {
    "column gathered fwd": {"all_gather": 1},
    "column gathered bwd": {"all_reduce": 1},  # the replicated input's gradient
    "row fwd": {"all_reduce": 1},
    "row bwd": {},
    "pair fwd": {"all_reduce": 1},  # Megatron's minimum: one all-reduce forward ...
    "pair bwd": {"all_reduce": 1},  # ... and one backward, for the input gradient
    "shim column fwd": {"all_gather": 1},
    "shim row fwd": {"all_reduce": 1},
    "sp pair fwd": {"all_gather": 1, "reduce_scatter": 1},
    "sp pair bwd": {"all_gather": 1, "reduce_scatter": 1},
}


def test_collective_counts_are_the_minimum(pools):
    counts = pools.run(2, case_counts)[0]
    assert counts == EXPECTED
