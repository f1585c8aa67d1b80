"""Mixed precision: torch.autocast (CPU bf16; CUDA bf16/fp16 where a GPU is present) through every layer, style and the
shim, against single-process autocast and torch's TP; bf16 parameters; TP x FSDP2 with a MixedPrecisionPolicy."""

import copy

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
from torch import nn
from torch.distributed.tensor import DTensor, Shard

import dtp
import parallel_linear
from dtp.runtime.sharding import local_slice
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import assert_close

BF16 = torch.bfloat16


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _layer_cases(tp, rank):
    """The nn.Linear, and [(dtp or shim layer, its input from the full x, weight placement, bias placement)]."""
    torch.manual_seed(0)
    ref = nn.Linear(8, 4 * tp)
    col = dtp.ColumnParallelLinear.from_linear(ref)
    row = dtp.RowParallelLinear.from_linear(ref, input_is_parallel=True)
    shim_col = parallel_linear.ColumnParallelLinear(8, 4 * tp, master_weight=ref.weight.detach())
    shim_row = parallel_linear.RowParallelLinear(8, 4 * tp, master_weight=ref.weight.detach())
    with torch.no_grad():
        shim_col.bias.copy_(local_slice(ref.bias.detach(), Shard(0), tp, rank))
        shim_row.bias.copy_(ref.bias)
    whole = lambda x: x  # noqa: E731
    mine = lambda x: local_slice(x, Shard(-1), tp, rank)  # noqa: E731
    return ref, [(col, whole, Shard(0), Shard(0)), (row, mine, Shard(1), None),
                 (shim_col, whole, Shard(0), Shard(0)), (shim_row, mine, Shard(1), None)]


def case_layers_under_autocast():
    mesh = dtp.default_mesh()
    tp, rank = mesh.size(), mesh.get_local_rank()
    ref, cases = _layer_cases(tp, rank)
    for layer, take, w_placement, b_placement in cases:
        what = f"{type(layer).__module__}.{type(layer).__name__}"
        x_full = torch.randn(3, 5, 8)
        x, xr = take(x_full).clone().requires_grad_(), x_full.clone().requires_grad_()
        ref.zero_grad()
        with torch.autocast("cpu", BF16):
            y, y_ref = layer(x), ref(xr)
        assert y.dtype == BF16 == y_ref.dtype, what
        assert_close(y, y_ref, f"{what} output", BF16)
        g = torch.randn(y_ref.shape)
        (y.float() * g).sum().backward()
        (y_ref.float() * g).sum().backward()
        assert x.grad.dtype == torch.float32
        assert_close(x.grad, take(xr.grad), f"{what} input grad", BF16)
        for name, placement in (("weight", w_placement), ("bias", b_placement)):
            p = getattr(layer, name)
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            assert p.dtype == grad.dtype == torch.float32, f"{what}.{name} and its gradient stay float32"
            ref_grad = getattr(ref, name).grad
            expected = local_slice(ref_grad, placement, tp, rank) if placement is not None else ref_grad
            assert_close(grad, expected, f"{what}.{name} grad", BF16, scale=2.0)


@pytest.mark.parametrize("world", [2, 4])
def test_every_layer_and_the_shim_under_autocast(pools, world):
    pools.run(world, case_layers_under_autocast)


def _gpt_step(model, ids, autocast=True):
    with torch.autocast("cpu", BF16, enabled=autocast):
        logits = model(ids)
        loss = dtp.vocab_parallel_cross_entropy(logits, ids) if isinstance(logits, DTensor) else \
            nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return full(logits), loss, {n: full(p.grad) for n, p in model.named_parameters()}


def case_styles_under_autocast(sp):
    torch.manual_seed(0)
    single = GPT(GPTConfig())
    mesh = dtp.default_mesh()
    ours = dtp.parallelize_module(copy.deepcopy(single), mesh, tp_plan(sp))
    theirs = torch_tp.parallelize_module(copy.deepcopy(single), mesh, tp_plan(sp, styles=torch_tp))
    ids = torch.randint(0, 96, (2, 8))
    (lo, loss, grads), (lt, loss_t, grads_t) = _gpt_step(ours, ids), _gpt_step(theirs, ids)
    ls, loss_s, grads_s = _gpt_step(single, ids)
    assert lo.dtype == lt.dtype == ls.dtype == BF16
    for what, a, b in (("logits vs torch TP", lo, lt), ("logits vs one process", lo, ls),
                       ("loss vs torch TP", loss, loss_t), ("loss vs one process", loss, loss_s)):
        assert_close(a, b, what, BF16)
    for name, p in ours.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        assert_close(grads[name], grads_t[name], f"grad of {name} vs torch TP", BF16, scale=2.0)
        assert_close(grads[name], grads_s[name], f"grad of {name} vs one process", BF16, scale=2.0)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_plan_styles_under_autocast_match_torch_tp(pools, world, sp):
    pools.run(world, case_styles_under_autocast, sp)


def case_bf16_parameters(sp):
    torch.manual_seed(0)
    single = GPT(GPTConfig()).to(BF16)
    ours = dtp.parallelize_module(copy.deepcopy(single), None, tp_plan(sp))
    ids = torch.randint(0, 96, (2, 8))
    (lo, loss, grads), (ls, loss_s, grads_s) = _gpt_step(ours, ids, False), _gpt_step(single, ids, False)
    assert lo.dtype == BF16
    assert_close(lo, ls, "bf16 logits", BF16)
    for name, p in ours.named_parameters():
        assert p.dtype == p.grad.dtype == BF16, name
        assert_close(grads[name], grads_s[name], f"bf16 grad of {name}", BF16, scale=2.0)


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_bf16_parameters_without_autocast(pools, sp):
    pools.run(2, case_bf16_parameters, sp)


def case_tp_fsdp_mixed_precision():
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(0)
    single = GPT(GPTConfig())
    mesh = dtp.init_mesh(dp=2, tp=2)
    model = dtp.parallelize_2d(copy.deepcopy(single), mesh, tp_plan(False), fsdp_units=["layers.*"],
                               mp_policy=MixedPrecisionPolicy(param_dtype=BF16, reduce_dtype=torch.float32))
    ids = torch.randint(0, 96, (4, 8))
    dp_rank = mesh["dp"].get_local_rank()
    logits = model(ids[dp_rank * 2:(dp_rank + 1) * 2])
    dtp.vocab_parallel_cross_entropy(logits, ids[dp_rank * 2:(dp_rank + 1) * 2]).backward()
    ls, _, grads_s = _gpt_step(single, ids)
    assert logits.dtype == BF16
    assert_close(full(logits), ls[dp_rank * 2:(dp_rank + 1) * 2], "TP x FSDP2 bf16 logits", BF16)
    for name, p in model.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, f"{name}: sharded parameters and gradients stay float32"
        assert_close(full(p.grad), grads_s[name], f"TP x FSDP2 bf16 grad of {name}", BF16, scale=2.0)


def test_tp_fsdp2_mixed_precision_policy(pools):
    pools.run(4, case_tp_fsdp_mixed_precision)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast (bf16/fp16) needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_single_gpu(dtype):
    """The autograd functions on one CUDA device (a 1-rank mesh needs a process group: run where NCCL is set up)."""
    from dtp.ops.linear_autograd import _autocast

    x, w = torch.randn(3, 8, device="cuda"), torch.randn(4, 8, device="cuda")
    with torch.autocast("cuda", dtype):
        cx, cw, _ = _autocast(x, w, None)
    assert cx.dtype == cw.dtype == dtype
