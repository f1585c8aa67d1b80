"""dtp.comms: the collectives predicted from the plan alone equal those measured in a real training step."""

from collections import Counter

import pytest
import torch
from torch import nn

import dtp
import dtp.comms
from examples.gpt import GPT, GPTConfig, tp_plan

MLP_PLAN = {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()}


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))


def _gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, n_layers=2))


def case_predicted_equals_measured(case):
    if case in ("mlp", "fsdp2d", "ddp2d"):
        model = _mlp()
        if case == "mlp":
            dtp.parallelize_module(model, None, MLP_PLAN)
        else:
            dtp.parallelize_2d(model, dtp.init_mesh(dp=2, tp=2), MLP_PLAN, data_parallel=case[:-2])
        inputs, tokens, loss_parallel, loss_fn = torch.randn(4, 8), (4,), False, lambda out: out.pow(2).sum()
    elif case == "packed":  # fused qkv_proj (unequal blocks) and gate_up_proj: ColwiseParallel's collectives
        from examples.nanogpt import GQAConfig, GQAModel, gqa_plan
        torch.manual_seed(0)
        cfg = GQAConfig()
        model = dtp.parallelize_module(GQAModel(cfg), None, gqa_plan(cfg))
        inputs, tokens, loss_parallel = torch.randint(0, cfg.vocab_size, (2, 7)), (2, 7), False
        loss_fn = lambda logits: logits.pow(2).mean()  # noqa: E731
    else:
        model = _gpt()
        sp = case == "gpt_sp"
        if case == "gpt_fsdp2d":
            dtp.parallelize_2d(model, dtp.init_mesh(dp=2, tp=2), tp_plan(), fsdp_units=["layers.*"])
        else:
            dtp.parallelize_module(model, None, tp_plan(sp))
        inputs = torch.randint(0, 30, (2, 7))  # 7 tokens: uneven over 2 and 4 ranks
        tokens, loss_parallel = (2, 7), True
        loss_fn = lambda logits: dtp.vocab_parallel_cross_entropy(logits, inputs)  # noqa: E731
    predicted = dtp.comms.predict(model, tokens, loss_parallel=loss_parallel)
    measured = dtp.comms.measure(model, inputs, loss_fn)
    assert predicted.signature() == measured.signature(), f"\npredicted:\n{predicted}\nmeasured:\n{measured}"
    # torch's CommDebugMode saw as many collectives of each kind as the recorder did
    debug = Counter()
    for op, n in measured.comm_debug_counts.items():
        name = op.replace("allreduce", "all_reduce").replace("allgather", "all_gather")
        debug[next(k for k in ("all_reduce", "all_gather", "reduce_scatter") if k in name)] += n
    assert debug == Counter(c.kind for c in measured), (debug, measured)
    return str(predicted), predicted.counts()


@pytest.mark.parametrize("world,case", [(2, "mlp"), (2, "gpt"), (4, "gpt"), (2, "gpt_sp"), (4, "gpt_sp"),
                                        (4, "fsdp2d"), (4, "ddp2d"), (4, "gpt_fsdp2d"), (2, "packed")])
def test_predicted_collectives_equal_measured(pools, world, case):
    table, counts = pools.run(world, case_predicted_equals_measured, case)[0]
    assert "bytes per step" in table
    if case == "gpt":  # 2 blocks x (2 + 2), embedding, lm-head input gradient, loss max + sum
        assert counts == Counter({("forward", "all_reduce"): 7, ("backward", "all_reduce"): 5})
    if case == "gpt_sp":
        assert ("forward", "all_reduce") in counts and counts[("forward", "all_reduce")] == 2  # the loss's only
