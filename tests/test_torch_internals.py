"""The torch internals dtp's hot path relies on are probed once; without them it takes torch's standard path. On the
torch that runs the suite: which probes hold, and the standard path (every probe forced off) gives the fast path's and
one process's gradients."""

import copy

import torch
from torch import nn
from torch.distributed.tensor import Replicate

import dtp
import dtp.runtime.apply as apply_
import dtp.runtime.collectives as collectives
import dtp.runtime.grads as grads

from .reference import assert_close


def _step(model, x, steps=2):
    for _ in range(steps):  # the second backward accumulates
        model(x).pow(2).sum().backward()
    return [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in model.parameters()]


def _mlp():  # float64: a bias gradient summed through LayerNorm nearly cancels, and fp32 rounding is then all it shows
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8), nn.LayerNorm(8)).double()


def _plan():
    return {"": dtp.PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            "0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()}


def case_standard_path_when_probes_fail():
    probes = {"direct apply": apply_.DIRECT, "direct all-reduce": collectives.DIRECT_ALLREDUCE,
              "engine will-execute": grads._WILL_EXECUTE_KNOWN, "queue callback": grads._queue_callback is not None,
              "grad_dtype": grads._HAS_GRAD_DTYPE}
    single = _mlp()
    x = torch.randn(4, 8, dtype=torch.float64)
    expected = _step(single, x)
    fast = _step(dtp.parallelize_module(copy.deepcopy(_mlp()), dtp.default_mesh(), _plan()), x)
    saved = (grads._WILL_EXECUTE_KNOWN, grads._queue_callback, collectives.DIRECT_ALLREDUCE, apply_.DIRECT)
    try:  # every probe off: autograd stores every gradient, nothing is deferred, dist.all_reduce, Function.apply
        grads._WILL_EXECUTE_KNOWN, grads._queue_callback, collectives.DIRECT_ALLREDUCE, apply_.DIRECT = (
            False, None, False, False)

        class Twice(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t * 2

            @staticmethod
            def backward(ctx, g):
                return g * 2

        assert apply_.direct_apply(Twice) == Twice.apply
        standard = _step(dtp.parallelize_module(copy.deepcopy(_mlp()), dtp.default_mesh(), _plan()), x)
    finally:
        grads._WILL_EXECUTE_KNOWN, grads._queue_callback, collectives.DIRECT_ALLREDUCE, apply_.DIRECT = saved
    for i, (a, b, ref) in enumerate(zip(fast, standard, expected)):
        assert_close(a, ref, f"fast path, parameter {i}")
        assert_close(b, ref, f"standard path, parameter {i}")
    return probes


def test_standard_path_matches_fast_path_on_this_torch(pools):
    probes = pools.run(2, case_standard_path_when_probes_fail)[0]
    print(f"torch {torch.__version__}: {probes}")
    assert probes["grad_dtype"] == hasattr(torch.Tensor, "grad_dtype")
