"""dtp.overlap.chunked_row_linear: nn.Linear's (and RowLinearFn's) output and gradients for any chunk count, one
all-reduce per non-empty chunk, uneven and empty batches included."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.tensor import Replicate, Shard

import dtp
from dtp.ops.overlap import chunk_rows, chunked_row_linear
from dtp.runtime.sharding import local_slice

from .reference import assert_close, assert_shard_close, expect_errors, rank_world, record_collectives


def case_chunked_row(in_f, out_f, batch, chunks, bias, seed=0):
    """Chunked row-parallel forward + backward against nn.Linear and against dtp.RowParallelLinear (RowLinearFn)."""
    rank, world = rank_world()
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias)
    if bias:
        with torch.no_grad():
            ref.bias.normal_()  # non-zero, so "added exactly once" is checked
    x_full = torch.randn(*batch, in_f)
    g_full = torch.randn(*batch, out_f)
    x_ref = x_full.clone().requires_grad_()
    y_ref = ref(x_ref)
    (y_ref * g_full).sum().backward()

    row = dtp.RowParallelLinear.from_linear(ref, input_is_parallel=True)  # RowLinearFn: the unchunked path
    ours = dtp.RowParallelLinear.from_linear(ref, input_is_parallel=True)  # same params, chunked function
    x_local = local_slice(x_full, Shard(-1), world, rank)
    x_row, x_ours = x_local.clone().requires_grad_(), x_local.clone().requires_grad_()
    y_row = row(x_row)
    y, calls = record_collectives(lambda: chunked_row_linear(x_ours, ours.weight, ours.bias, chunks))
    rows = x_full.numel() // in_f if in_f else 0
    expected_calls = len(chunk_rows(rows, chunks)) if world > 1 else 0
    assert [k for k, _ in calls] == ["all_reduce"] * expected_calls, calls
    assert type(y) is torch.Tensor and (y.grad_fn is not None), f"output {type(y).__name__}, grad_fn={y.grad_fn}"
    assert_close(y, y_ref.detach(), "output vs nn.Linear")
    assert_close(y, y_row.detach(), "output vs RowLinearFn")
    _, back_calls = record_collectives(lambda: (y * g_full).sum().backward())
    assert back_calls == [], f"backward issued collectives: {back_calls}"
    (y_row * g_full).sum().backward()
    x_grad_expected = local_slice(x_ref.grad, Shard(-1), world, rank)
    assert_close(x_ours.grad, x_grad_expected, "input grad vs nn.Linear")
    assert_close(x_ours.grad, x_row.grad, "input grad vs RowLinearFn")
    assert_shard_close(ours.weight.grad, ref.weight.grad, Shard(1), "weight grad vs nn.Linear")
    assert_close(ours.weight.grad.to_local(), row.weight.grad.to_local(), "weight grad vs RowLinearFn")
    assert ours.weight.grad.placements == row.weight.grad.placements == (Shard(1),)
    assert ours.weight.grad.shape == ours.weight.shape and ours.weight.grad.dtype == ours.weight.dtype
    if bias:
        assert_shard_close(ours.bias.grad, ref.bias.grad, Replicate(), "bias grad vs nn.Linear")
        assert_close(ours.bias.grad.to_local(), row.bias.grad.to_local(), "bias grad vs RowLinearFn")
    else:
        assert ours.bias is None


def case_all_chunkings():
    """Every chunk count of the brief on uneven, tiny, multi-dim and empty batches, with and without bias."""
    for chunks in (1, 2, 3):
        for batch in ((7,), (5,), (2,), (1,), (0,), (2, 3), (3, 0), (2, 5, 3)):
            for bias in (True, False):
                case_chunked_row(6, 5, batch, chunks, bias, seed=chunks)


def test_chunked_row_matches_linear_and_row_fn(pools):
    pools.run(2, case_all_chunkings)


def test_chunk_rows_cuts_like_torch_chunk():
    for rows in range(0, 12):
        for chunks in range(1, 6):
            expected = [len(c) for c in torch.arange(rows).chunk(chunks)] if rows else []
            pieces = chunk_rows(rows, chunks)
            assert [n for _, n in pieces] == expected, (rows, chunks, pieces)
            assert [s for s, _ in pieces] == [sum(expected[:i]) for i in range(len(expected))]


def case_clear_errors():
    """Wrong chunk counts, input widths and parameter layouts are errors that say what was expected."""
    rank, world = rank_world()
    layer = dtp.RowParallelLinear.from_linear(nn.Linear(8, 4), input_is_parallel=True)
    col = dtp.ColumnParallelLinear.from_linear(nn.Linear(8, 4))
    x = torch.randn(3, 8 // world)
    expect_errors([
        (ValueError, lambda: chunked_row_linear(x, layer.weight, layer.bias, 0), ["chunks", "positive int", "0"]),
        (ValueError, lambda: chunked_row_linear(x, layer.weight, layer.bias, 1.5), ["chunks", "1.5"]),
        (ValueError, lambda: chunked_row_linear(torch.randn(3, 9), layer.weight, layer.bias), ["width", "(3, 9)"]),
        (ValueError, lambda: chunked_row_linear(x, col.weight, layer.bias), ["weight", "Shard(1)"]),
        (ValueError, lambda: chunked_row_linear(x, layer.weight.to_local(), layer.bias), ["weight", "Tensor"]),
        (ValueError, lambda: chunked_row_linear(x, layer.weight, col.bias), ["bias", "Replicate"]),
        (TypeError, lambda: chunked_row_linear([1.0], layer.weight, layer.bias), ["plain tensor", "list"]),
    ])


def test_clear_errors(pools):
    pools.run(2, case_clear_errors)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.sampled_from([1, 2, 3]), in_mult=st.integers(1, 4), out_f=st.integers(1, 9),
       batch=st.lists(st.integers(0, 5), min_size=1, max_size=3), chunks=st.integers(1, 5), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_chunked_row_any_shape(pools, world, in_mult, out_f, batch, chunks, bias, seed):
    pools.run(world, case_chunked_row, world * in_mult + (seed % world), out_f, tuple(batch), chunks, bias, seed)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
