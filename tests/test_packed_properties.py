"""Hypothesis: any block sizes (equal as an int, or unequal), tp, input width, bias and output layout give nn.Linear's
results through ColumnParallelLinear(blocks=) and through PackedColwiseParallel -> PackedRowwiseParallel: the
initial values, outputs, input gradients and every parameter gradient in the original packed layout."""

import copy

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import dtp

from .reference import assert_close
from .test_packed import full_grads, packed_local


def case_packed_layer(blocks, sizes, in_f, bias, gather, batch, seed):
    """`blocks` as the layer and styles take it (a count or the sizes), `sizes` the block sizes it means."""
    rank, tp = dist.get_rank(), dist.get_world_size()
    out_f = sum(sizes)
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias)
    torch.manual_seed(seed)
    layer = dtp.ColumnParallelLinear(in_f, out_f, bias, blocks=blocks, gather_output=gather)
    for name, value in dtp.full_state_dict(layer).items():  # nn.Linear's draws, split by blocks and back
        assert torch.equal(value, ref.state_dict()[name]), name
    assert torch.equal(layer.weight.to_local(), packed_local(ref.weight.detach(), sizes, 0, tp, rank))
    torch.manual_seed(seed + 1)
    x = torch.randn(*batch, in_f)
    grad_out = torch.randn(*batch, out_f)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, y_ref = layer(xs[0]), ref(xs[1])
    assert_close(y, y_ref if gather else packed_local(y_ref.detach(), sizes, -1, tp, rank), "output")
    (y * (grad_out if gather else packed_local(grad_out, sizes, -1, tp, rank))).sum().backward()
    (y_ref * grad_out).sum().backward()
    assert_close(xs[0].grad, xs[1].grad, "input gradient")
    grads = full_grads(layer)
    for name, p in ref.named_parameters():
        assert_close(grads[name], p.grad, f"gradient of {name}")

    # the styles: a packed column projection feeding a row projection packed alike on its input
    single = nn.Sequential(copy.deepcopy(ref), nn.Linear(out_f, 3, bias=bias))
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), {"0": dtp.PackedColwiseParallel(blocks=blocks),
                                                       "1": dtp.PackedRowwiseParallel(blocks=blocks)})
    xs = [x.clone().requires_grad_() for _ in range(2)]
    z, z_ref = model(xs[0]), single(xs[1])
    assert_close(z, z_ref, "styled output")
    z.pow(2).sum().backward()
    z_ref.pow(2).sum().backward()
    assert_close(xs[0].grad, xs[1].grad, "styled input gradient")
    grads = full_grads(model)
    for name, p in single.named_parameters():
        assert_close(grads[name], p.grad, f"styled gradient of {name}")


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(world=st.integers(1, 4), shares=st.lists(st.integers(1, 3), min_size=1, max_size=4), as_int=st.booleans(),
       in_f=st.integers(1, 6), bias=st.booleans(), gather=st.booleans(),
       batch=st.lists(st.integers(1, 3), min_size=1, max_size=2), seed=st.integers(0, 2**16))
def test_packed_layer_any_blocks(pools, world, shares, as_int, in_f, bias, gather, batch, seed):
    """Each block a multiple of tp (shares x tp); as_int: len(shares) equal blocks, passed as a count."""
    sizes = tuple(s * world for s in shares) if not as_int else (shares[0] * world,) * len(shares)
    blocks = len(sizes) if as_int else sizes
    pools.run(world, case_packed_layer, blocks, sizes, in_f, bias, gather, tuple(batch), seed)
