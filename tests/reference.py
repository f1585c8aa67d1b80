"""Helpers the test cases share: tolerances, comparisons with single-process results, collective counts."""

from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._python_dispatch import TorchDispatchMode

from dtp.runtime.sharding import local_slice

TORCH_VERSION = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])  # (major, minor), e.g. (2, 13)

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
              torch.float64: dict(rtol=1e-10, atol=1e-10)}


def full(t):
    """A DTensor's full tensor (one all-gather or all-reduce); a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def checkpointed(model, how: str):
    """model (`model.layers` a list of blocks) with every block under activation checkpointing: torch.utils.checkpoint
    "reentrant" or "nonreentrant", or torch's checkpoint_wrapper ("wrapper")."""
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import checkpoint

    for i, block in enumerate(list(model.layers)):
        if how == "wrapper":
            model.layers[i] = checkpoint_wrapper(block)
        else:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=how == "reentrant")
    return model


def rank_world():
    return dist.get_rank(), dist.get_world_size()


def assert_close(actual, expected, what, dtype=torch.float32, scale=1.0):
    """actual == expected within the dtype's tolerance (scaled by the magnitude of expected)."""
    assert not isinstance(actual, DTensor), f"{what}: got a DTensor where a plain tensor was expected"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOLERANCES[dtype]
    mag = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(), rtol=tol["rtol"] * scale,
                               atol=tol["atol"] * scale * mag, msg=lambda m: f"{what}: {m}")


def compare_forward_backward(model, single, x):
    """model(x) against single(x) under the loss sum(Y²): the output (a plain tensor), the input gradient and every
    parameter gradient (a DTensor's as its full tensor) equal; returns the two inputs (model's, single's)."""
    xo, xs = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    out, ref = model(xo), single(xs)
    assert type(out) is torch.Tensor, f"the output is a {type(out).__name__}"
    assert_close(out, ref, "output")
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    assert_close(xo.grad, xs.grad, "input gradient")
    refs = dict(single.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or refs[name].grad is not None:
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            assert_close(grad, refs[name].grad, f"grad of {name}")
    return xo, xs


def assert_shard_close(param_or_grad, full_expected, placement, what, dtype=torch.float32, scale=1.0):
    """A DTensor's local shard equals this rank's slice of the full single-process tensor."""
    assert isinstance(param_or_grad, DTensor), f"{what}: expected a DTensor, got {type(param_or_grad).__name__}"
    assert param_or_grad.placements == (placement,), f"{what}: placements {param_or_grad.placements} != ({placement},)"
    rank, world = param_or_grad.device_mesh.get_local_rank(), param_or_grad.device_mesh.size()
    assert_close(param_or_grad.to_local(), local_slice(full_expected, placement, world, rank), what, dtype, scale)


def _kind(op_name: str) -> str:
    """all_reduce / all_gather / reduce_scatter / ... for a c10d or functional-collective op name."""
    name = op_name.replace("allreduce", "all_reduce").replace("allgather", "all_gather")
    for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "alltoall", "broadcast", "barrier"):
        if kind in name:
            return kind
    return op_name


def count_collectives(fn):
    """Run fn under CommDebugMode; return (fn's result, Counter of collective kinds)."""
    with CommDebugMode() as mode:
        out = fn()
    counts = Counter()
    for op, n in mode.get_comm_counts().items():
        counts[_kind(str(op))] += n
    return out, counts


class _RecordCollectives(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.")) and "wait" not in name:
            kind = _kind(name)
            tensors = [a for a in args if isinstance(a, torch.Tensor)] or [t for a in args if isinstance(a, list)
                                                                           for t in a if isinstance(t, torch.Tensor)]
            self.calls.append((kind, tensors[-1].numel() if tensors else None))
        return func(*args, **(kwargs or {}))


def record_collectives(fn):
    """Run fn; return (its result, [(functional collective op name, input numel), ...]) in issue order."""
    with _RecordCollectives() as mode:
        out = fn()
    return out, mode.calls


def expect_errors(cases):
    """For each (exception type(s), call, needles): call() raises it with every needle in the message; returns the messages."""
    import pytest

    messages = []
    for exc, call, needles in cases:
        with pytest.raises(exc) as info:
            call()
        assert all(n in str(info.value) for n in needles), (needles, str(info.value))
        messages.append(str(info.value))
    return messages


def compare_causal_lm_step(model, single, ids, step):
    """A Hugging Face causal LM and its single-process twin on ids (labels = ids): logits and loss equal, then both
    backward."""
    out, ref = model(input_ids=ids, labels=ids), single(input_ids=ids, labels=ids)
    assert_close(out.logits, ref.logits, f"step {step} logits")
    assert_close(out.loss, ref.loss, f"step {step} loss")
    out.loss.backward()
    ref.loss.backward()
