"""Expert parallelism composed: init_mesh(dp=, ep=, tp=) layouts, ep x tp on 2 x 2 (attention and the shared expert
over tp, experts over ep), ep borrowing tp ranks (tokens sliced over tp), and ep x FSDP2 (dense blocks sharded over
dp, experts over efsdp with their gradients divided by dp); each against one process (logits, loss, every
gradient, 3 AdamW steps)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import dtp

from .moe_model import MoEModel, ep_plan, loss_fn
from .reference import assert_close, expect_errors


def case_meshes():
    rank = dist.get_rank()
    titan = dtp.init_mesh(dp=2, ep=2, tp=2)  # ep inside dp
    assert dtp.init_mesh(dp=2, ep=2, tp=2) is titan
    borrowed = dtp.init_mesh(ep=4, tp=2)  # ep over dp and tp ranks
    plain = dtp.init_mesh(ep=2)  # dp = 4, two copies of each expert group
    expect_errors([(ValueError, lambda: dtp.init_mesh(ep=3), ["ep=3", "dp=4"]),
                   (ValueError, lambda: dtp.init_mesh(ep=0), ["positive"])])
    ranks = {name: titan[name].mesh.tolist() for name in ("dp", "ep", "tp", "efsdp")}
    return ranks, borrowed["ep"].mesh.tolist(), borrowed["tp"].mesh.tolist(), plain["efsdp"].mesh.tolist(), rank


def test_init_mesh_with_ep(pools):
    """dp 2 x tp 2 with ep 2: ep is the dp axis (ranks {0, 2}, {1, 3}); ep 4 with tp 2 spans all ranks; ep 2 of dp 4
    leaves two ranks holding each expert (efsdp)."""
    for ranks, borrowed_ep, borrowed_tp, efsdp, rank in pools.run(4, case_meshes):
        assert ranks["tp"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert ranks["ep"] == ranks["dp"] == [rank % 2, rank % 2 + 2]
        assert ranks["efsdp"] == [rank] and borrowed_ep == [0, 1, 2, 3] and len(borrowed_tp) == 2
        assert efsdp == [rank % 2, rank % 2 + 2]


TP_PLAN = {"layers.*.attention.w[qkv]": dtp.ColwiseParallel(), "layers.*.attention.wo": dtp.RowwiseParallel(),
           "layers.*.moe.shared_expert.w[13]": dtp.ColwiseParallel(), "layers.*.moe.shared_expert.w2": dtp.RowwiseParallel()}


def _check_grads(model, single, step, dp_group, experts_summed_over=None):
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        local = p.grad.to_local()
        expert = ".experts." in name
        group = experts_summed_over if expert else dp_group
        if group is not None:
            dist.all_reduce(local, group=group)  # the data-parallel sum, here by hand
        assert_close(p.grad.full_tensor(), ref.grad, f"step {step} grad of {name}", scale=3.0)


def case_ep_tp(layout):
    """"titan": dp 2 x tp 2, ep = dp (tokens shared over tp, each tp rank runs its ep rank's experts whole);
    "borrowed": ep = 4 over dp and tp, each tp rank dispatching its slice of the tp group's tokens; "etp": ep = dp and
    each expert split over tp (w1 / w3 colwise, w2 rowwise)."""
    torch.manual_seed(0)
    single = MoEModel(num_experts=8, top_k=2)
    model = copy.deepcopy(single)
    mesh = dtp.init_mesh(dp=2, ep=4 if layout == "borrowed" else 2, tp=2)
    style = {"titan": lambda: dtp.ExpertParallel(), "borrowed": lambda: dtp.ExpertParallel(tp_mesh=mesh["tp"]),
             "etp": lambda: dtp.ExpertTensorParallel(tp_mesh=mesh["tp"])}[layout]()
    dtp.parallelize_module(model, mesh["ep"], {"layers.*.moe.experts": style}, replicate_rest=False)  # experts, then TP
    dtp.parallelize_module(model, mesh["tp"], TP_PLAN)
    dp, dp_rank = mesh.size("dp"), mesh["dp"].get_local_rank()
    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 32, (2 * dp, 6), generator=gen), torch.randint(0, 32, (2 * dp, 6), generator=gen)
    mine = slice(2 * dp_rank, 2 * dp_rank + 2)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (model, single)]
    for step in range(3):
        logits, ref_logits = model(ids[mine]), single(ids)
        assert_close(logits, ref_logits[mine], f"step {step} logits")
        loss, ref_loss = loss_fn(model, logits, targets[mine]) / dp, loss_fn(single, ref_logits, targets)
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh["dp"].get_group())
        assert_close(total, ref_loss, f"step {step} loss")
        loss.backward()
        ref_loss.backward()
        _check_grads(model, single, step, mesh["dp"].get_group())
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    return [str(p.placements) for p in model.layers[0].moe.experts.parameters()]


@pytest.mark.parametrize("layout", ["titan", "borrowed", "etp"])
def test_ep_times_tp_on_2x2(pools, layout):
    placements = pools.run(4, case_ep_tp, layout)[0]
    if layout == "etp":
        assert placements == ["(Shard(dim=0), Shard(dim=1))", "(Shard(dim=0), Shard(dim=2))",
                              "(Shard(dim=0), Shard(dim=1))"]


def case_ep_fsdp():
    """dp 2 = ep 2 (2 ranks) or dp 4 with ep 2 (4 ranks: each expert on 2 ranks, FSDP2-sharded over efsdp): dense
    blocks fully_shard over dp, experts over efsdp, their reduce divided by dp (FSDP averages over efsdp only)."""
    torch.manual_seed(0)
    world = dist.get_world_size()
    single = MoEModel(num_experts=4, top_k=2)
    model = copy.deepcopy(single)
    mesh = dtp.init_mesh(ep=2)
    dtp.parallelize_module(model, mesh["ep"], ep_plan(), replicate_rest=False)  # dense params stay FSDP2's
    for block in model.layers:
        dtp.fully_shard_experts(block.moe.experts, mesh)
        dtp.fully_shard(block, mesh=mesh["dp"])
    dtp.fully_shard(model, mesh=mesh["dp"])
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 32, (2 * world, 6), generator=gen), torch.randint(0, 32, (2 * world, 6), generator=gen)
    mine = slice(2 * rank, 2 * rank + 2)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (model, single)]
    for step in range(3):
        logits, ref_logits = model(ids[mine]), single(ids)
        assert_close(logits, ref_logits[mine], f"step {step} logits")
        loss, ref_loss = loss_fn(model, logits, targets[mine]), loss_fn(single, ref_logits, targets)
        loss.backward()
        ref_loss.backward()
        for (name, p), ref in zip(model.named_parameters(), single.parameters()):
            assert isinstance(p.grad, DTensor), name
            assert_close(p.grad.full_tensor(), ref.grad, f"step {step} grad of {name}", scale=3.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    return [str(p.placements) for p in model.layers[0].moe.experts.parameters()][0]


def case_ep_fsdp_refused():
    """torch 2.7 on gloo: no way to divide the experts' reduce by dp, so a clear error on every rank, before FSDP2."""
    model = MoEModel(num_experts=4, top_k=2)
    mesh = dtp.init_mesh(ep=2)
    dtp.parallelize_module(model, mesh["ep"], ep_plan(), replicate_rest=False)
    with pytest.raises(NotImplementedError, match=r"dp=\d.*set_gradient_divide_factor.*gloo"):
        dtp.fully_shard_experts(model.layers[0].moe.experts, mesh)
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_ep_times_fsdp2(pools, world):
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_gradient_divide_factor"):  # torch 2.7 (gloo has no PREMUL_SUM)
        assert pools.run(world, case_ep_fsdp_refused) == [True] * world
        return
    placements = pools.run(world, case_ep_fsdp)[0]
    assert "Shard(dim=0)" in placements


def case_etp_comms():
    import dtp.comms

    torch.manual_seed(0)
    model = MoEModel(num_experts=4, top_k=2)
    mesh = dtp.init_mesh(dp=2, ep=2, tp=2)
    dtp.parallelize_module(model, mesh["ep"], {"layers.*.moe.experts": dtp.ExpertTensorParallel(tp_mesh=mesh["tp"])},
                           replicate_rest=False)
    dtp.parallelize_module(model, mesh["tp"], TP_PLAN)
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(mesh["dp"].get_local_rank()))
    predicted = dtp.comms.predict(model, tokens_shape=tuple(ids.shape))
    measured = dtp.comms.measure(model, ids, lambda logits: loss_fn(model, logits, ids))
    assert predicted.counts() == measured.counts(), (predicted.counts(), measured.counts())
    return dict(measured.counts())


def test_etp_collectives_predicted_and_measured(pools):
    """Per MoE layer: ExpertParallel's 3 + 2 all-to-alls over ep and one all-reduce each way over tp, beside the
    attention's and the shared expert's TP all-reduces (one each way per Colwise -> Rowwise pair)."""
    counts = pools.run(4, case_etp_comms)[0]
    assert counts[("forward", "all_to_all")] == 6 and counts[("backward", "all_to_all")] == 4
    assert counts[("forward", "all_reduce")] == 2 * 3  # per layer: attention, shared expert, experts
