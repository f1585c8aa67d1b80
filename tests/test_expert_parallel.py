"""ExpertParallel: a torchtitan-style MoE (top-k router, shared expert, balance loss) with its experts split over ep
against one process: logits, loss, every gradient and 3 AdamW steps; skewed routing, experts and ranks with no
token, top-1 / top-2, ep 2 and 4, tokens each rank's own (Shard(0)) or shared (Replicate()), a hypothesis property,
errors on every rank before any collective, and the collectives counted."""

import copy

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings, strategies as st
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp

from .moe_model import MoEModel, ep_plan, loss_fn
from .reference import assert_close, expect_errors


def to_expert(e):
    return lambda index, num_experts: torch.full_like(index, e) if index.shape[-1] == 1 else \
        (torch.arange(index.shape[-1]).expand_as(index) + e) % num_experts


def to_first_half(index, num_experts):  # experts in the upper half never get a token (whole ranks idle at ep >= 2)
    return index % max(1, num_experts // 2)


ROUTES = {"router": None, "one expert": to_expert(1), "first half": to_first_half}


def _sum_over_ranks(t):
    t = t.clone()
    dist.all_reduce(t)
    return t


def _grads_match(model, single, step, shared, skip=None):
    """Expert weights: this rank's Shard(0) slice of one process's gradient; the rest: summed over the ranks (each
    saw its own tokens) unless the ranks shared the batch."""
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        if skip and skip in name:
            continue
        assert isinstance(p, DTensor) and p.grad is not None, name
        if p.placements == (Shard(0),):
            ep, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
            assert_close(p.grad.to_local(), ref.grad.chunk(ep)[rank], f"step {step} grad of {name}", scale=3.0)
        else:
            assert p.placements == (Replicate(),), name
            if not shared:
                p.grad.to_local().copy_(_sum_over_ranks(p.grad.to_local()))  # the data-parallel sum, here by hand
            assert_close(p.grad.to_local(), ref.grad, f"step {step} grad of {name}", scale=3.0)


def run_against_one_process(num_experts=4, top_k=2, route=None, shared=False, tokens=(2, 6), steps=3, seed=0):
    """The model at ep = world against one process on the global batch (each rank its rows, or all of them)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    single = MoEModel(num_experts=num_experts, top_k=top_k, route=route)
    model = copy.deepcopy(single)
    mesh = dtp.init_mesh(tp=world)
    dtp.parallelize_module(model, mesh, ep_plan(input_layouts=Replicate() if shared else Shard(0)))
    gen = torch.Generator().manual_seed(seed + 1)
    batch, seq = tokens[0] * (1 if shared else world), tokens[1]
    ids, targets = torch.randint(0, 32, (batch, seq), generator=gen), torch.randint(0, 32, (batch, seq), generator=gen)
    mine = slice(None) if shared else slice(rank * tokens[0], (rank + 1) * tokens[0])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, single)]
    for step in range(steps):
        logits, ref_logits = model(ids[mine]), single(ids)
        assert_close(logits, ref_logits[mine], f"step {step} logits")
        loss, ref_loss = loss_fn(model, logits, targets[mine]), loss_fn(single, ref_logits, targets)
        if not shared:
            loss = loss / world  # each rank's micro-batch is 1/world of the global mean
        assert_close(loss.detach() if shared else _sum_over_ranks(loss.detach()), ref_loss, f"step {step} loss")
        loss.backward()
        ref_loss.backward()
        _grads_match(model, single, step, shared)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    return [str(p.placements) for p in model.layers[0].moe.experts.parameters()]


def case_routings(top_k, shared):
    for name, route in ROUTES.items():  # the router: 8 experts, 3 steps; skewed routings: 4 experts, one step
        num_experts = 8 if route is None else 4
        try:
            placements = run_against_one_process(num_experts, top_k, route, shared, steps=3 if route is None else 1)
        except AssertionError as e:
            raise AssertionError(f"route {name!r}, {num_experts} experts: {e}") from None
    return placements


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("shared", [False, True], ids=["own-tokens", "shared-batch"])
def test_expert_parallel_equals_one_process(pools, world, top_k, shared):
    """The router's, the shared expert's, the dense and every expert's gradient, with the router's routing, every
    token to one expert, and half the experts (at ep 4 two whole ranks) without a token."""
    placements = pools.run(world, case_routings, top_k, shared)[0]
    assert placements == ["(Shard(dim=0),)"] * 3


def case_property(num_experts, top_k, batch, seq, shared, seed):
    run_against_one_process(num_experts, top_k, None, shared, tokens=(batch, seq), steps=1, seed=seed)


@settings(max_examples=8, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), per_rank=st.integers(1, 2), top_k=st.integers(1, 3),
       batch=st.integers(1, 2), seq=st.integers(1, 5), shared=st.booleans(), seed=st.integers(0, 99))
def test_expert_parallel_property(pools, world, per_rank, top_k, batch, seq, shared, seed):
    """Any expert count (a multiple of ep), top-k, ep, token count and layout."""
    pools.run(world, case_property, world * per_rank * 2, min(top_k, world * per_rank * 2), batch, seq, shared, seed)


def case_errors():
    mesh = dtp.init_mesh(tp=dist.get_world_size())
    model = MoEModel(num_experts=6)
    before = [p.clone() for p in model.parameters()]
    expect_errors([
        (ValueError, lambda: dtp.parallelize_module(model, mesh, ep_plan()),
         ["layers.0.moe.experts", "6 experts", "ep=4"]),
        (ValueError, lambda: dtp.parallelize_module(model, mesh, {"layers.*.moe.router": dtp.ExpertParallel()}),
         ["stacked on dim 0"]),
        (ValueError, lambda: dtp.ExpertParallel(input_layouts=Shard(1)), ["Shard(0)"]),
    ])
    assert all(torch.equal(a, b) and not isinstance(a, DTensor) for a, b in zip(model.parameters(), before))


def test_errors_on_every_rank_before_any_collective(pools):
    """An expert count that does not divide by ep names the module, the count and ep; nothing changes."""
    pools.run(4, case_errors)


def case_comm_counts(shared):
    import dtp.comms

    torch.manual_seed(0)
    world = dist.get_world_size()
    model = MoEModel(num_experts=2 * world, layers=2)
    dtp.parallelize_module(model, dtp.init_mesh(tp=world), ep_plan(input_layouts=Replicate() if shared else Shard(0)))
    ids = torch.randint(0, 32, (3, 5), generator=torch.Generator().manual_seed(dist.get_rank()))
    predicted = dtp.comms.predict(model, tokens_shape=tuple(ids.shape))
    measured = dtp.comms.measure(model, ids, lambda logits: loss_fn(model, logits, ids))
    assert predicted.counts() == measured.counts(), (predicted.counts(), measured.counts())
    known = sorted((c.phase, c.kind, c.numel) for c in predicted if c.numel >= 0)
    routed = [(c.phase, c.kind) for c in predicted if c.numel < 0]
    got = sorted((c.phase, c.kind, c.numel) for c in measured)
    for entry in known:  # every predicted size is measured; the routed ones are whatever arrived here
        got.remove(entry)
    assert sorted((p, k) for p, k, _ in got) == sorted(routed), (got, routed)
    assert measured.comm_debug_counts  # CommDebugMode saw the same step
    return dict(measured.counts())


@pytest.mark.parametrize("shared", [False, True], ids=["own-tokens", "shared-batch"])
def test_collectives_predicted_and_measured(pools, shared):
    """Per MoE layer: 2 all-to-alls forward (tokens, outputs) + the counts exchange, 2 backward; a shared batch adds
    its all-gathers (the outputs forward, dX and the routing weights' gradient backward)."""
    counts = pools.run(2, case_comm_counts, shared)[0]
    layers = 2
    expected = {("forward", "all_to_all"): 3 * layers, ("backward", "all_to_all"): 2 * layers}
    if shared:
        expected |= {("forward", "all_gather"): layers, ("backward", "all_gather"): 2 * layers}
    assert counts == expected


def case_double_backward(shared):
    """A gradient penalty (the gradient of the loss by the token embeddings, squared) through the all-to-alls: each
    all-to-all's backward is the mirror all-to-all as an autograd function under create_graph."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    single = MoEModel(num_experts=2 * world, top_k=2, layers=1)
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.init_mesh(tp=world), ep_plan(input_layouts=Replicate() if shared else Shard(0)))
    ids = torch.randint(0, 32, (2 * world, 5), generator=torch.Generator().manual_seed(3))
    mine = slice(None) if shared else slice(2 * rank, 2 * rank + 2)

    def penalised(m, ids, scale):
        x = m.tok_embeddings(ids)
        h = x + m.layers[0].moe(m.layers[0].moe_norm(x))  # the MoE alone (CPU attention has no double backward)
        loss = m.output(m.norm(h)).logsumexp(-1).mean() * scale
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        return loss + (g * g).sum() * 10

    total = penalised(model, ids[mine], 1 if shared else 1 / world)
    total.backward()
    ref = penalised(single, ids, 1)
    ref.backward()
    assert_close(total.detach() if shared else _sum_over_ranks(total.detach()), ref.detach(), "penalised loss")
    _grads_match(model, single, 0, shared, skip="attention")


@pytest.mark.parametrize("shared", [False, True], ids=["own-tokens", "shared-batch"])
def test_double_backward_through_the_dispatch(pools, shared):
    pools.run(2, case_double_backward, shared)
