"""Packed projections: nanoGPT's fused c_attn and a GQA model's fused qkv_proj / gate_up_proj split block by block,
against the single-process model (logits, loss, every gradient in the original layout, 3 AdamW steps), with
ColwiseParallel's collectives; the Hugging Face strings; clear errors.  (State dicts and checkpoints:
test_packed_checkpoint.py; any block sizes: test_packed_properties.py.)"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp
from examples.nanogpt import GPT, GPTConfig, GQAConfig, GQAModel, gpt_plan, gqa_plan

from .reference import assert_close, count_collectives, expect_errors


def packed_local(full, blocks, dim, tp, rank):
    """rank's shard of a packed tensor, by hand: cat_i chunk_rank(block_i) along dim."""
    return torch.cat([b.chunk(tp, dim)[rank] for b in full.split(list(blocks), dim)], dim)


def full_grads(model):
    """{name: the full gradient in the model's original (packed) layout}."""
    layouts = dtp.packed_layouts(model)
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name] = layouts[name].unpack(g) if name in layouts else g
    return out


def build(which, hf_strings=False, seed=0):
    torch.manual_seed(seed)
    single = GPT(GPTConfig()) if which == "gpt" else GQAModel(GQAConfig())
    model = copy.deepcopy(single)
    plan = gpt_plan() if which == "gpt" else gqa_plan(single.cfg, hf_strings)
    dtp.parallelize_module(model, dtp.default_mesh(), plan)
    return single, model


def loss_of(model, ids):
    logits = model(ids[:, :-1])
    return logits, F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def case_model_matches_one_process(which, hf_strings):
    rank, tp = dist.get_rank(), dist.get_world_size()
    single, model = build(which, hf_strings)
    cfg = single.cfg
    # each rank holds its heads of q, k and v (or its slice of gate and of up), bias too
    if which == "gpt":
        packed = {"transformer.h.0.attn.c_attn.weight": (cfg.n_embd,) * 3, "transformer.h.0.attn.c_attn.bias": (cfg.n_embd,) * 3}
    else:
        attn = single.layers[0].self_attn
        packed = {"layers.0.self_attn.qkv_proj.weight": attn.block_sizes(), "layers.0.self_attn.qkv_proj.bias":
                  attn.block_sizes(), "layers.1.mlp.gate_up_proj.weight": (cfg.hidden, cfg.hidden)}
    params, ref_params = dict(model.named_parameters()), dict(single.named_parameters())
    for name, blocks in packed.items():
        assert params[name].placements == (Shard(0),), name
        assert torch.equal(params[name].to_local(), packed_local(ref_params[name].detach(), blocks, 0, tp, rank)), name
    assert set(dtp.packed_layouts(model)) >= set(packed)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6) for m in (model, single)]
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    for step in range(3):
        (logits, loss), (ref_logits, ref_loss) = loss_of(model, ids), loss_of(single, ids)
        assert_close(logits, ref_logits, f"step {step} logits")
        assert_close(loss, ref_loss, f"step {step} loss")
        loss.backward()
        ref_loss.backward()
        grads = full_grads(model)
        for name, ref in single.named_parameters():
            assert_close(grads[name], ref.grad, f"step {step} gradient of {name}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    state = dtp.full_state_dict(model)
    for name, ref in single.state_dict().items():
        assert_close(state[name], ref, f"{name} after 3 AdamW steps")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("which", ["gpt", "gqa"])
def test_packed_models_match_one_process(pools, which, world):
    pools.run(world, case_model_matches_one_process, which, False)


def test_hf_packed_strings_match_one_process(pools):
    pools.run(2, case_model_matches_one_process, "gqa", True)


def case_no_extra_collective():
    """A packed projection issues exactly ColwiseParallel's collectives, forward and backward."""
    counts = {}
    for kind in ("packed", "plain"):
        blocks = {"blocks": 3} if kind == "packed" else {}
        for gather in (True, False):
            torch.manual_seed(0)
            layer = dtp.ColumnParallelLinear(8, 12, gather_output=gather, **blocks)
            x = torch.randn(4, 8, requires_grad=True)
            y, fwd = count_collectives(lambda: layer(x))
            _, bwd = count_collectives(lambda: y.sum().backward())
            counts[kind, "layer", gather] = (dict(fwd), dict(bwd))
        torch.manual_seed(0)
        single, model = build("gpt")
        if kind == "plain":  # the same model with c_attn split contiguously (the wrong heads, the same traffic)
            torch.manual_seed(0)
            model = copy.deepcopy(single)
            dtp.parallelize_module(model, dtp.default_mesh(), {**gpt_plan(), "transformer.h.*.attn.c_attn":
                                                                 dtp.ColwiseParallel()})
        ids = torch.randint(0, single.cfg.vocab_size, (2, 9))
        (_, loss), fwd = count_collectives(lambda: loss_of(model, ids))
        _, bwd = count_collectives(lambda: loss.backward())
        counts[kind, "gpt"] = (dict(fwd), dict(bwd))
    return counts


def test_no_extra_collective(pools):
    counts = pools.run(2, case_no_extra_collective)[0]
    for key in [k for k in counts if k[0] == "packed"]:
        assert counts[key] == counts[("plain",) + key[1:]], (key, counts)
    assert counts["packed", "layer", True] == ({"all_gather": 1}, {"all_reduce": 1})
    assert counts["packed", "layer", False] == ({}, {"all_reduce": 1})


class Experts(nn.Module):
    """transformers-style expert weights as raw parameters: gate_up packed on dim -2, another packed on dim -1."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 8, 4))
        self.gate_up_t = nn.Parameter(torch.randn(2, 4, 8))
        self.gate_up_bias = nn.Parameter(torch.randn(8))
        self.down_bias = nn.Parameter(torch.randn(8))


def case_hf_parameter_strings():
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    single = nn.Module()
    single.experts = Experts()
    model = copy.deepcopy(single)
    plan = {"experts.gate_up_proj": "packed_colwise", "experts.gate_up_t": "packed_rowwise",
            "experts.gate_up_bias": "packed_colwise", "experts.down_bias": "packed_rowwise"}
    dtp.parallelize_module(model, dtp.default_mesh(), plan)
    e, ref = model.experts, single.experts
    assert torch.equal(e.gate_up_proj.to_local(), packed_local(ref.gate_up_proj.detach(), (4, 4), 1, tp, rank))
    assert torch.equal(e.gate_up_t.to_local(), packed_local(ref.gate_up_t.detach(), (4, 4), 2, tp, rank))
    assert torch.equal(e.gate_up_bias.to_local(), packed_local(ref.gate_up_bias.detach(), (4, 4), 0, tp, rank))
    assert e.down_bias.placements == (Replicate(),)
    state = dtp.full_state_dict(model)
    for name, value in single.state_dict().items():
        assert torch.equal(state[name], value), name
    dtp.load_full_state_dict(model, {k: v * 2 for k, v in state.items()})
    for name, value in dtp.full_state_dict(model).items():
        assert torch.equal(value, single.state_dict()[name] * 2), name
    modules = dtp.explain_plan(GQAModel(GQAConfig()), gqa_plan(GQAConfig(), hf_strings=True))
    assert modules["layers.0.mlp.gate_up_proj"] == dtp.PackedColwiseParallel(blocks=2)
    linear = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 4))
    assert dtp.explain_plan(linear, {"1": "packed_rowwise"})["1"] == dtp.PackedRowwiseParallel(blocks=2)


def test_hf_parameter_strings(pools):
    pools.run(2, case_hf_parameter_strings)


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def case_errors():
    """Clear errors on every rank (tp 4), before anything changes."""
    mesh = dtp.default_mesh()

    def plan_error(module_or_cfg, plan):
        model = GQAModel(module_or_cfg) if isinstance(module_or_cfg, GQAConfig) else module_or_cfg
        before = {n: p.clone() for n, p in model.named_parameters()}
        try:
            dtp.parallelize_module(model, mesh, plan)
        finally:
            for n, p in model.named_parameters():
                assert not isinstance(p, DTensor) and torch.equal(p, before[n]), f"{n} changed"

    lin = nn.Sequential(nn.Linear(4, 12))
    return expect_errors([
        (ValueError, lambda: plan_error(lin, {"0": dtp.PackedColwiseParallel(blocks=(8, 2, 2))}),
         ["'0'", "block 1 has 2 features", "tp size 4", "[8, 2, 2]"]),
        (ValueError, lambda: plan_error(lin, {"0": dtp.PackedColwiseParallel(blocks=5)}),
         ["blocks=5", "12 packed features"]),
        (ValueError, lambda: plan_error(lin, {"0": dtp.PackedColwiseParallel(blocks=(4, 4))}),
         ["[4, 4] sum to 8", "12 features"]),
        (TypeError, lambda: plan_error(lin, {"0": dtp.PackedColwiseParallel(blocks="qkv")}), ["blocks must be"]),
        (ValueError, lambda: plan_error(lin, {"0": dtp.PackedColwiseParallel(blocks=3, use_local_output=False)}),
         ["use_local_output=False", "no torch placement"]),
        (ValueError, lambda: plan_error(lin, {"0": dtp.PackedColwiseParallel(blocks=3, output_layouts=Shard(0))}),
         ["output_layouts=Shard(dim=0)", "Shard(-1)", "Replicate()"]),
        (ValueError, lambda: plan_error(nn.Sequential(nn.Linear(12, 4)),
                                        {"0": dtp.PackedRowwiseParallel(blocks=3, input_layouts=Replicate())}),
         ["input_layouts=Replicate()", "Shard(-1)"]),
        (TypeError, lambda: plan_error(nn.Sequential(OwnForward(4, 12)), {"0": dtp.PackedColwiseParallel(blocks=3)}),
         ["OwnForward", "forward of its own"]),
        # 2 kv heads of 4 over 4 ranks: every block divides by 4, but a k / v head would be cut
        (ValueError, lambda: plan_error(GQAConfig(n_kv_heads=2), gqa_plan(GQAConfig(n_kv_heads=2))),
         ["qkv_proj", "head cut", "tp size 4"]),
        (ValueError, lambda: plan_error(_with_param(torch.randn(2, 6, 4)), {"w": "packed_colwise"}),
         ["'w'", "block 0 has 3 features", "tp size 4"]),
        (ValueError, lambda: dtp.ColumnParallelLinear(4, 12, blocks=(8, 2, 2)), ["blocks=", "block 1 has 2"]),
        (ValueError, lambda: dtp.ColumnParallelLinear(4, 12, blocks=3, gather_output=False, use_local_output=False),
         ["use_local_output=False", "blocks="]),
        (TypeError, lambda: dtp.RowParallelLinear(12, 4, blocks=3), ["RowParallelLinear", "PackedRowwiseParallel"]),
    ])


def _with_param(value):
    module = nn.Module()
    module.w = nn.Parameter(value)
    return module


def test_errors_on_every_rank(pools):
    per_rank = pools.run(4, case_errors)
    assert all(messages == per_rank[0] for messages in per_rank)


def case_verify_packed():
    """dtp.verify compares a packed model's gradients in their original layout (unpacked), so a right plan passes."""
    from examples.nanogpt import GQAConfig, GQAModel, gqa_plan

    cfg = GQAConfig(n_layers=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    report = dtp.verify(lambda: GQAModel(cfg), gqa_plan(cfg), ids, ids.roll(-1, 1),
                        lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten()), modes=("tp",))
    assert not report.failures(), report.failures()
    return True


def test_verify_unpacks_packed_gradients(pools):
    assert pools.run(2, case_verify_packed) == [True, True]
