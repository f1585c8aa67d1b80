"""transformers' expert-parallel plans: tiny Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 (from config, no download)
through `dtp.parallelize_module(model, mesh, model.ep_plan)` equal one process (logits, loss, every gradient, 3 AdamW
steps), alone at ep 2 (DeepSeek-V3 also at 4) and with the TP plan on a 2-D (dp, tp) mesh."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

import dtp
from dtp.plan.hf_plans import HF_STYLES, without_expert_entries

from .reference import assert_close

transformers = pytest.importorskip("transformers")


def test_dtp_knows_every_expert_parallel_string():
    """Every string transformers' expert_parallel.py registers is a dtp plan string."""
    from transformers.distributed import expert_parallel  # registers its strings in ALL_PARALLEL_STYLES

    unknown = sorted(set(expert_parallel.ALL_PARALLEL_STYLES) - set(HF_STYLES))
    assert not unknown, f"transformers registers plan strings dtp does not know: {unknown}"


def build(kind, experts=4):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=32, num_experts_per_tok=2)
    if kind == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=experts, **common))
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            num_experts=experts, moe_intermediate_size=16, decoder_sparse_step=1, **common))
    if kind == "olmoe":
        return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(num_experts=experts, **common))
    cfg = transformers.DeepseekV3Config(  # MLA, group-limited routing, a shared expert, one dense layer first
        n_routed_experts=experts, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
        topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        **common)
    return transformers.DeepseekV3ForCausalLM(cfg)


def _summed(t, group):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def case_hf(kind, tp=None, borrowed=False):
    """ep = the world (every rank the same batch), or tp plan on mesh["tp"] + ep plan on the same ranks with a batch
    per dp rank (dense gradients summed over dp by hand: each dp rank's loss is 1/dp of the global mean), or
    (borrowed) the ep plan over all dp x tp ranks, the tokens of a tp group sliced over it (transformers' ep > tp)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    single = build(kind, experts=2 * (tp if tp and not borrowed else world))
    model = copy.deepcopy(single)
    experts_everywhere = tp is None or borrowed  # each expert on one rank only: its gradient is complete there
    if tp is None:
        mesh, dp, dp_group = dtp.init_mesh(tp=world), 1, None
        dtp.parallelize_module(model, mesh, model.ep_plan)
    elif borrowed:
        moe_mesh = dtp.init_mesh(dp=world // tp, ep=world, tp=tp)
        dp, dp_group = world // tp, moe_mesh["dp"].get_group()
        dtp.parallelize_module(model, moe_mesh["tp"], without_expert_entries(model.tp_plan, model.ep_plan))
        plan = {key: dtp.ExpertParallel(tp_mesh=moe_mesh["tp"]) if value == "ep_dispatch_experts" else value
                for key, value in model.ep_plan.items()}  # the ranks sharing a batch: a tp group, not the ep group
        dtp.parallelize_module(model, moe_mesh["ep"], plan)  # after the TP plan: the experts' whole weights split
        rank = moe_mesh["dp"].get_local_rank() * tp
    else:
        mesh2 = dtp.init_mesh(dp=world // tp, tp=tp)
        mesh, dp, dp_group = mesh2["tp"], world // tp, mesh2["dp"].get_group()
        dtp.parallelize_module(model, mesh, without_expert_entries(model.tp_plan, model.ep_plan))
        dtp.parallelize_module(model, mesh, model.ep_plan)
        assert all(m.num_experts == 2 for n, m in model.named_modules() if n.endswith("mlp.experts"))
    ids = torch.randint(0, 64, (2 * dp, 8), generator=torch.Generator().manual_seed(1))
    mine = slice(None) if dp == 1 else slice(2 * (rank // tp), 2 * (rank // tp) + 2)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6) for m in (model, single)]
    for step in range(3):
        out, ref = model(input_ids=ids[mine], labels=ids[mine]), single(input_ids=ids, labels=ids)
        assert_close(out.logits, ref.logits[mine], f"step {step} logits")
        loss = out.loss / dp
        assert_close(_summed(loss.detach(), dp_group) if dp > 1 else loss.detach(), ref.loss, f"step {step} loss")
        loss.backward()
        ref.loss.backward()
        for (name, p), r in zip(model.named_parameters(), single.parameters()):
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            expert = p.placements == (Shard(0),) and name.rpartition(".")[0].endswith("experts")  # whole experts here
            if dp > 1 and not (expert and experts_everywhere):
                local.copy_(_summed(local, dp_group))  # the data-parallel sum, here by hand
            if expert:
                assert_close(local, r.grad.chunk(p.device_mesh.size())[p.device_mesh.get_local_rank()],
                             f"step {step} grad of {name}", scale=3.0)
            else:
                assert_close(p.grad.full_tensor(), r.grad, f"step {step} grad of {name}", scale=3.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    return sorted({str(p.placements) for p in experts.parameters()})


@pytest.mark.parametrize("kind, world", [("mixtral", 2), ("qwen3_moe", 2), ("olmoe", 2),
                                         ("deepseek_v3", 2), ("deepseek_v3", 4)])
def test_transformers_moe_with_its_own_ep_plan(pools, kind, world):
    """grouped_gemm (expert weights Shard(0)) + ep_dispatch_experts (tokens all-to-all) equal one process."""
    assert pools.run(world, case_hf, kind)[0] == ["(Shard(dim=0),)"]


@pytest.mark.parametrize("kind, borrowed", [("mixtral", False), ("qwen3_moe", False), ("mixtral", True)],
                         ids=["mixtral-ep=tp", "qwen3_moe-ep=tp", "mixtral-ep=dp*tp"])
def test_tp_plan_and_ep_plan_on_a_2d_mesh(pools, kind, borrowed):
    """dp 2 x tp 2: attention (and Qwen3's dense parts) split over tp, experts over the same ranks (ep = tp) or over
    all four (ep 4, the tokens of each tp group sliced over it), a batch per dp rank."""
    assert pools.run(4, case_hf, kind, 2, borrowed)[0] == ["(Shard(dim=0),)"]
