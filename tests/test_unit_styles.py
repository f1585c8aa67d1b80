"""transformers' unit_colwise / unit_rowwise: projections split by whole heads, also with fewer heads than ranks (a
group of ranks shares each head), against one process: outputs, every parameter gradient, the input gradient, and a
gradient penalty (double backward); where tp divides the heads they are plain ColwiseParallel / RowwiseParallel."""

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp

from .reference import assert_close, compare_forward_backward


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


class GroupedQueryAttention(nn.Module):
    """GQA on whatever heads this rank holds: its query heads each read key/value head (local q // local kv)."""

    def __init__(self, dim=12, heads=4, kv_heads=1, head_dim=4):
        super().__init__()
        self.head_dim, self.num_attention_heads, self.num_key_value_heads = head_dim, heads, kv_heads
        self.q_proj, self.o_proj = nn.Linear(dim, heads * head_dim), nn.Linear(heads * head_dim, dim)
        self.k_proj, self.v_proj = nn.Linear(dim, kv_heads * head_dim), nn.Linear(dim, kv_heads * head_dim)

    def forward(self, x):
        split = lambda t: t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)  # (b, local heads, s, head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), dim=-1) @ v
        return self.o_proj(attn.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, heads, kv_heads):
        super().__init__()
        self.config = SimpleNamespace(head_dim=4)  # where transformers reads head_dim for the unit styles
        self.self_attn = GroupedQueryAttention(heads=heads, kv_heads=kv_heads)

    def forward(self, x):
        return x + self.self_attn(x)


def plan_for(heads, tp):
    """transformers' pattern: k/v unit_colwise; q and o as well when there are fewer query heads than ranks."""
    few = heads % tp != 0
    return {"self_attn.q_proj": "unit_colwise" if few else "colwise", "self_attn.k_proj": "unit_colwise",
            "self_attn.v_proj": "unit_colwise", "self_attn.o_proj": "unit_rowwise" if few else "rowwise"}


def case_unit_styles(heads, kv_heads):
    torch.manual_seed(0)
    single = Block(heads, kv_heads)
    model = copy.deepcopy(single)
    mesh = dtp.default_mesh()
    tp = mesh.size()
    plan = plan_for(heads, tp)
    chosen = dtp.explain_plan(model, plan, mesh)
    dtp.parallelize_module(model, mesh, plan)
    shared = kv_heads % tp != 0  # key/value heads shared by groups of ranks
    kv = chosen["self_attn.k_proj"]
    assert (kv == dtp.UnitColwiseParallel(head_dim=4)) if shared else (kv == dtp.ColwiseParallel()), kv
    assert model.self_attn.k_proj.weight.placements == ((Replicate(),) if shared else (Shard(0),))
    x, x_ref = compare_forward_backward(model, single, torch.randn(2, 5, 12))
    model.zero_grad(), single.zero_grad()
    for m, inp in ((model, x), (single, x_ref)):  # a gradient penalty: |dL/dx|^2 through create_graph
        (g,) = torch.autograd.grad(m(inp).pow(2).sum(), inp, create_graph=True)
        g.pow(2).sum().backward()
    for (name, p), r in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), r.grad, f"double-backward grad of {name}", scale=3.0)
    return str(kv)


@pytest.mark.parametrize("world,heads,kv_heads", [
    (2, 4, 1),  # 1 key/value head on both ranks
    (2, 4, 2),  # tp divides the heads: plain colwise
    (4, 8, 2),  # 2 key/value heads on 2 groups of 2 ranks
    (4, 2, 1),  # 2 query heads on 4 ranks too: q unit_colwise, o_proj unit_rowwise
])
def test_unit_styles_equal_one_process(pools, world, heads, kv_heads):
    results = pools.run(world, case_unit_styles, heads, kv_heads)
    assert len(set(results)) == 1, results


def case_bad_head_dim():
    model = Block(4, 2)
    with pytest.raises(ValueError, match=r"self_attn.k_proj.*out_features=8.*head_dim=3"):
        dtp.parallelize_module(model, dtp.default_mesh(), {"self_attn.k_proj": dtp.UnitColwiseParallel(head_dim=3)})
    assert not any(isinstance(p, DTensor) for p in model.parameters()), "nothing changed"
    return True


def test_unit_style_with_a_head_dim_that_does_not_divide_is_refused(pools):
    assert pools.run(2, case_bad_head_dim) == [True, True]


def case_minicpm5_moe(kv_heads):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "MiniCPM5MoeForCausalLM"):
        pytest.skip("this transformers has no MiniCPM5-MoE (unit_colwise came with it)")
    from zoo.tiny_configs import tiny_config

    torch.manual_seed(0)
    config = tiny_config(transformers.MiniCPM5MoeConfig, num_key_value_heads=kv_heads)
    config._attn_implementation = "sdpa"  # grouped-query sdpa: local query heads over local key/value heads
    single = transformers.MiniCPM5MoeForCausalLM(config).eval()
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), model.tp_plan)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    out, ref = model(input_ids=ids, labels=ids), single(input_ids=ids, labels=ids)
    assert_close(out.logits, ref.logits, "logits")
    out.loss.backward()
    ref.loss.backward()
    for (name, p), r in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), r.grad, f"grad of {name}", scale=3.0)
    return str(model.model.layers[0].self_attn.k_proj.weight.placements)


@pytest.mark.parametrize("world,kv_heads", [(2, 4), (4, 2)])
def test_minicpm5_moe_with_its_own_plan(pools, world, kv_heads):
    """MiniCPM5-MoE's plan puts k_proj / v_proj on unit_colwise: 4 key/value heads split at tp 2, 2 shared by pairs
    of ranks at tp 4."""
    results = pools.run(world, case_minicpm5_moe, kv_heads)
    assert results == ["(Shard(dim=0),)" if kv_heads % world == 0 else "(Replicate(),)"] * world, results


def case_unit_styles_compiled(heads, kv_heads):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    single = Block(heads, kv_heads)
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), plan_for(heads, dtp.default_mesh().size()))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(2, 5, 12)
    out, ref = compiled(x), single(x)
    assert_close(out, ref, "compiled output")
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    for (name, p), r in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), r.grad, f"compiled grad of {name}")
    return counter.frame_count


def test_unit_styles_compile_into_one_graph(pools):
    """2 query heads and 1 key/value head on 4 ranks: unit_colwise and unit_rowwise with shared heads, traced as DTensor
    ops and functional collectives, one graph."""
    assert pools.run(4, case_unit_styles_compiled, 2, 1) == [1] * 4


def case_unit_styles_under_lora(heads, kv_heads):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    single = Block(heads, kv_heads)
    lora = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    single = peft.inject_adapter_in_model(lora, single)
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), plan_for(heads, dtp.default_mesh().size()))
    compare_forward_backward(model, single, torch.randn(2, 5, 12))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    return len(trained)


@pytest.mark.parametrize("world,heads,kv_heads", [(2, 4, 1), (4, 2, 1)])
def test_unit_styles_under_peft_lora(pools, world, heads, kv_heads):
    """peft LoRA on every projection: lora_B takes the unit split of its base layer, lora_A is replicated."""
    assert pools.run(world, case_unit_styles_under_lora, heads, kv_heads) == [8] * world  # A, B of 4


def case_unit_styles_2d(data_parallel):
    """dp 2 x tp 2: 1 key/value head shared by both tp ranks, FSDP2 or DDP over dp (gradients averaged); 2 SGD steps
    (SGD, not Adam: k_proj's bias has a gradient of rounding noise, softmax being blind to it, which Adam would
    normalise into a full step)."""
    mesh = dtp.init_mesh(dp=2, tp=2)
    dp_rank = mesh["dp"].get_local_rank()
    torch.manual_seed(0)
    single = Block(4, 1)
    model = dtp.parallelize_2d(copy.deepcopy(single), mesh, plan_for(4, 2), data_parallel=data_parallel)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (single, model)]
    for step in range(2):
        x = torch.randn(4, 5, 12)
        single(x).pow(2).mean().backward()
        model(x.chunk(2)[dp_rank]).pow(2).mean().backward()  # each dp half's mean, averaged over dp
        for opt in opts:
            opt.step()
            opt.zero_grad()
    params = dict(model.named_parameters())
    for name, p in single.named_parameters():
        assert_close(full(params[name]), p, f"{name} after 2 SGD steps", scale=10.0)
    return True


@pytest.mark.parametrize("data_parallel", ["fsdp", "ddp"])
def test_unit_styles_compose_with_data_parallel(pools, data_parallel):
    assert pools.run(4, case_unit_styles_2d, data_parallel) == [True] * 4


def case_unit_checkpoint(path, phase):
    """The same plan at tp 4 (q, k, v unit_colwise with shared heads, o_proj unit_rowwise: every weight Replicate) and
    at tp 2 (q colwise, o_proj rowwise: Shard): a state dict through torch.save / weights_only, and a DCP checkpoint
    with its optimizer state saved at 4 and loaded at 2."""
    torch.manual_seed(0)
    single = Block(2, 1)
    mesh = dtp.default_mesh()
    build = lambda: dtp.parallelize_module(copy.deepcopy(single), mesh, plan_for(2, mesh.size()))
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    x = torch.randn(2, 5, 12)
    if phase == "save":
        model(x).pow(2).sum().backward()
        opt.step()
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        fresh = build()
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
            assert torch.equal(a.to_local(), b.to_local()), name
        dtp.save_checkpoint(path, model, opt)
        return model(x).detach()
    dtp.load_checkpoint(path, model, opt)
    assert isinstance(model.self_attn.o_proj.weight, DTensor)
    return model(x).detach(), model.self_attn.o_proj.weight.placements


def test_unit_plan_checkpoint_reshards_between_shared_and_split_heads(pools, tmp_path):
    path = str(tmp_path / "ckpt")
    saved = pools.run(4, case_unit_checkpoint, path, "save")[0]
    loaded = pools.run(2, case_unit_checkpoint, path, "load")
    for out, placements in loaded:
        assert placements == (Shard(1),)
        torch.testing.assert_close(out, saved, rtol=1e-6, atol=1e-6)
