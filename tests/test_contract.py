"""parallel_linear.py: the contract outside verifiers test, exactly as they use it."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import parallel_linear as pl

from .reference import assert_close, expect_errors, rank_world
from tests.slowness import allowed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _single_process(master, bias, x, g):
    """nn.Linear with the same weight and a zero bias: output and gradients for loss (y * g).sum()."""
    ref = nn.Linear(master.shape[1], master.shape[0], bias=bias)
    with torch.no_grad():
        ref.weight.copy_(master)
        if bias:
            ref.bias.zero_()
    x = x.clone().requires_grad_()
    y = ref(x)
    (y * g).sum().backward()
    return ref, x, y.detach()


def case_contract(in_f, out_f, bias, batch, loss):
    """Slices, zero bias, full output on every rank, gradients = slices of nn.Linear's, inputs' grads too."""
    rank, world = rank_world()
    torch.manual_seed(42)  # the same master weight, input and upstream gradient on every rank
    master = torch.randn(out_f, in_f)
    x = torch.randn(*batch, in_f)
    g = torch.randn(*batch, out_f) if loss == "general" else torch.ones(*batch, out_f)
    ref, x_ref, y_ref = _single_process(master, bias, x, g)
    o, i = out_f // world, in_f // world
    rows, cols = slice(rank * o, (rank + 1) * o), slice(rank * i, (rank + 1) * i)

    col = pl.ColumnParallelLinear(in_f, out_f, bias, master)
    row = pl.RowParallelLinear(in_f, out_f, bias, master)
    for layer, expected_w in ((col, master[rows]), (row, master[:, cols])):
        assert type(layer.weight) is nn.Parameter, type(layer.weight)
        assert torch.equal(layer.weight.data, expected_w)
    if bias:
        assert type(col.bias) is nn.Parameter and torch.equal(col.bias.data, torch.zeros(o))
        assert type(row.bias) is nn.Parameter and torch.equal(row.bias.data, torch.zeros(out_f))
    else:
        assert col.bias is None and row.bias is None

    xc = x.clone().requires_grad_()
    yc = col(xc)
    xr = x[..., cols].clone().requires_grad_()
    yr = row(xr)
    for name, y in (("column", yc), ("row", yr)):
        assert type(y) is torch.Tensor and y.grad_fn is not None, f"{name}: {type(y).__name__}"
        assert_close(y, y_ref, f"{name} output")
        (y * g).sum().backward() if loss == "general" else y.sum().backward()
    assert_close(col.weight.grad, ref.weight.grad[rows], "column weight grad")
    assert_close(row.weight.grad, ref.weight.grad[:, cols], "row weight grad")
    assert_close(xc.grad, x_ref.grad, "column input grad")
    assert_close(xr.grad, x_ref.grad[..., cols], "row input grad")
    if bias:
        assert type(col.bias.grad) is torch.Tensor and type(row.bias.grad) is torch.Tensor
        assert_close(col.bias.grad, ref.bias.grad[rows], "column bias grad")
        assert_close(row.bias.grad, ref.bias.grad, "row bias grad")


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss", ["sum", "general"])
def test_contract_forward_backward(pools, world, bias, loss):
    pools.run(world, case_contract, 8, 12, bias, (3,), loss)


@pytest.mark.parametrize("world", [2, 4])
def test_contract_3d_input(pools, world):
    pools.run(world, case_contract, 16, 8, True, (2, 5), "general")


def case_accumulate_and_bias_update():
    """Gradients accumulate over backward passes; an in-place bias update is used by the next forward."""
    rank, world = rank_world()
    torch.manual_seed(0)
    master = torch.randn(8, 4)
    x = torch.randn(3, 4)
    col = pl.ColumnParallelLinear(4, 8, True, master)
    row = pl.RowParallelLinear(4, 8, True, master)
    xs = x[:, rank * 4 // world:(rank + 1) * 4 // world]
    for _ in range(3):
        col(x).sum().backward()
        row(xs).sum().backward()
    ref = nn.Linear(4, 8)
    with torch.no_grad():
        ref.weight.copy_(master)
        ref.bias.zero_()
    for _ in range(3):
        ref(x).sum().backward()
    o, i = 8 // world, 4 // world
    assert_close(col.weight.grad, ref.weight.grad[rank * o:(rank + 1) * o], "3x accumulated column weight grad")
    assert_close(row.weight.grad, ref.weight.grad[:, rank * i:(rank + 1) * i], "3x accumulated row weight grad")
    assert_close(row.bias.grad, ref.bias.grad, "3x accumulated row bias grad")
    new_bias = torch.arange(8.0)
    with torch.no_grad():
        col.bias.copy_(new_bias[rank * o:(rank + 1) * o])
        row.bias.copy_(new_bias)
        ref.bias.copy_(new_bias)
    assert_close(col(x), ref(x), "column output after bias.copy_")
    assert_close(row(xs), ref(x), "row output after bias.copy_ (added once)")


@pytest.mark.parametrize("world", [1, 2, 4])
def test_contract_accumulation_and_bias_update(pools, world):
    pools.run(world, case_accumulate_and_bias_update)


def case_no_global_rng():
    """Neither constructor draws from the global generator, with or without master_weight; ranks agree."""
    state = torch.get_rng_state()
    col = pl.ColumnParallelLinear(4, 8, True, torch.ones(8, 4))
    row = pl.RowParallelLinear(4, 8, True, None)
    col2 = pl.ColumnParallelLinear(4, 8, False, None)
    assert torch.equal(torch.get_rng_state(), state), "a constructor consumed the global RNG"
    return row.weight.detach().sum().item(), col2.weight.detach().sum().item()


def test_contract_constructor_draws_nothing_globally(pools):
    a, b = pools.run(2, case_no_global_rng)
    assert len(set([a[0], b[0]])) == 2  # different slices of one agreed weight


def case_errors():
    """Every rank raises the same clear error before any collective."""
    return expect_errors([
        (ValueError, lambda: pl.ColumnParallelLinear(4, 10, True, None), ["out_features=10", "world size 4"]),
        (ValueError, lambda: pl.RowParallelLinear(6, 8, True, None), ["in_features=6", "world size 4"]),
        (ValueError, lambda: pl.ColumnParallelLinear(4, 8, True, torch.ones(4, 8)), ["(4, 8)", "(8, 4)"]),
        (ValueError, lambda: pl.RowParallelLinear(4, 8, True, torch.ones(32)), ["2-D", "(8, 4)"]),
        (TypeError, lambda: pl.RowParallelLinear(4, 8, True, [[1.0] * 4] * 8), ["master_weight", "list"]),
        (TypeError, lambda: pl.ColumnParallelLinear(4, 8, True, torch.ones(8, 4, dtype=torch.int64)), ["floating"]),
        (ValueError, lambda: pl.ColumnParallelLinear(0, 8, True, None), ["in_features", "0"]),
    ])


def test_contract_errors_on_every_rank(pools):
    per_rank = pools.run(4, case_errors)
    assert all(m == per_rank[0] for m in per_rank)


def test_contract_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        pl.ColumnParallelLinear(4, 8, True, None)


def test_plain_checkout_imports_without_install(tmp_path):
    """An outside tool puts the checkout on sys.path and imports parallel_linear and dtp from anywhere."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import parallel_linear, dtp
        assert parallel_linear.__file__.startswith({ROOT!r}), parallel_linear.__file__
        assert dtp.__file__.startswith({ROOT!r}), dtp.__file__
        print(parallel_linear.ColumnParallelLinear.__name__, parallel_linear.RowParallelLinear.__name__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=allowed(120))
    assert out.returncode == 0, out.stderr
    assert "ColumnParallelLinear RowParallelLinear" in out.stdout
