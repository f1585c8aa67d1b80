"""Hugging Face tp_plan strings: each string's meaning, parameter entries, and a real transformers LlamaForCausalLM
(built from a tiny config, no download) parallelized with `dtp.parallelize_module(model, mesh, model.tp_plan)`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp
from dtp.plan.hf_plans import HF_STYLES, hf_parameter_placement
from dtp.plan.moe_styles import AllReduceParallel, MlaKvAProjParallel, MoeExpertsParallel, MoeIdentityParallel

from .reference import assert_close, compare_causal_lm_step


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def test_every_string_means_what_transformers_registers():
    expected = {
        "colwise": dtp.ColwiseParallel(), "colwise_rep": dtp.ColwiseParallel(output_layouts=Replicate()),
        "colwise_gather_output": dtp.ColwiseParallel(output_layouts=Replicate()),
        "rowwise": dtp.RowwiseParallel(), "rowwise_rep": dtp.RowwiseParallel(input_layouts=Replicate()),
        "rowwise_split_input": dtp.RowwiseParallel(input_layouts=Replicate()),
        "embedding_rowwise": dtp.VocabParallel(), "embedding_colwise": dtp.ColwiseParallel(output_layouts=Replicate()),
        "sequence_parallel": dtp.SequenceParallel(use_local_output=True), "replicate": dtp.ReplicateParallel(),
        "local_params": dtp.ReplicateParallel(), "replicated_with_grad_allreduce": dtp.ReplicateParallel(grad_all_reduce=True),
        "all_reduce": AllReduceParallel(),
        # transformers: PackedColwiseParallel() / PackedRowwiseParallel(), split_factor=2
        "packed_colwise": dtp.PackedColwiseParallel(blocks=2), "packed_rowwise": dtp.PackedRowwiseParallel(blocks=2),
        "moe_tp_experts": MoeExpertsParallel(), "moe_identity_expert": MoeIdentityParallel(),
        "mla_kv_a_proj": MlaKvAProjParallel(),  # rope_dim from the model's config at plan time
        # transformers' expert_parallel.py: whole experts over ep, the tokens all-to-all (the mesh shares the batch)
        "ep_dispatch_experts": dtp.ExpertParallel(input_layouts=Replicate()),
        "grouped_gemm": dtp.ExpertParallel(input_layouts=Replicate()),
        # transformers 5.25: whole heads per rank, shared by groups of ranks where there are fewer heads than ranks
        "unit_colwise": dtp.UnitColwiseParallel(), "unit_rowwise": dtp.UnitRowwiseParallel(),
    }
    assert {name: make() for name, make in HF_STYLES.items()} == expected
    assert hf_parameter_placement("colwise", "attn.sinks", 1, "") == Shard(0)
    assert hf_parameter_placement("colwise", "experts.w", 3, "") == Shard(1)
    assert hf_parameter_placement("rowwise", "o_proj.bias", 1, "") == Replicate()
    assert hf_parameter_placement("rowwise", "o_proj.weight", 2, "") == Shard(1)
    assert hf_parameter_placement("embedding_colwise", "e.weight", 2, "") == Shard(1)
    assert hf_parameter_placement("packed_colwise", "experts.gate_up_proj", 3, "") == Shard(1)  # by 2 blocks
    assert hf_parameter_placement("packed_rowwise", "experts.gate_up_proj", 3, "") == Shard(2)  # by 2 blocks
    assert hf_parameter_placement("packed_rowwise", "experts.bias", 1, "") == Replicate()
    assert hf_parameter_placement("grouped_gemm", "experts.gate_up_proj", 3, "") == Shard(0)
    assert hf_parameter_placement("unit_colwise", "attn.k_proj.weight", 2, "") == Shard(0)
    assert hf_parameter_placement("unit_rowwise", "attn.o_proj.bias", 1, "") == Replicate()


def test_dtp_knows_every_string_transformers_registers():
    """A string transformers adds to its TP registry shows up here the day it is added."""
    registry = pytest.importorskip("transformers.distributed.tensor_parallel").ALL_PARALLEL_STYLES
    unknown = sorted(set(registry) - set(HF_STYLES))
    assert not unknown, f"transformers registers TP plan strings dtp does not know: {unknown}"


class SinkAttention(nn.Module):
    """gpt-oss / granite-swa style: per-head learnable sinks next to q and o projections (plan: sinks colwise,
    the module local_params), plus a Qwen3-style per-head norm (replicated_with_grad_allreduce)."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x):
        q = self.q_norm(self.q_proj(x).unflatten(-1, (-1, self.head_dim)))  # (b, s, local heads, head_dim)
        gate = torch.sigmoid(q.sum(-1) + self.sinks)  # one sink per (local) head
        return self.o_proj((q * gate.unsqueeze(-1)).flatten(-2))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(30, 16)
        self.self_attn = SinkAttention()
        self.shared = nn.Linear(16, 16, bias=False)
        self.lm_head = nn.Linear(16, 30, bias=False)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        h = h + self.self_attn(h)
        return self.lm_head(h + self.shared(h))


def case_hf_strings_on_a_model():
    torch.manual_seed(0)
    single = Tiny()
    model = copy.deepcopy(single)
    plan = {"embed_tokens": "embedding_rowwise", "self_attn.q_proj": "colwise", "self_attn.sinks": "colwise",
            "self_attn.q_norm": "replicated_with_grad_allreduce", "self_attn": "local_params",
            "self_attn.o_proj": "rowwise", "lm_head": "colwise_gather_output", "shared": "replicate",
            "no_such_module": "colwise"}
    with pytest.warns(UserWarning, match="'no_such_module'"):  # as transformers: unused rules only warn
        dtp.parallelize_module(model, dtp.default_mesh(), plan)
    assert model.self_attn.sinks.placements == (Shard(0),)
    assert model.self_attn.q_norm.weight.placements == (Replicate(),)
    ids = torch.randint(0, 30, (2, 5))
    logits = model(ids)
    assert not isinstance(logits, DTensor)
    assert_close(logits, single(ids), "logits")
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    F.cross_entropy(single(ids).flatten(0, 1), ids.flatten()).backward()
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), ref.grad, f"grad of {name}")


@pytest.mark.parametrize("world", [2, 4])
def test_hf_strings_and_parameter_entries(pools, world):
    pools.run(world, case_hf_strings_on_a_model)


def case_transformers_llama(world_shape, tied=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=world_shape, max_position_embeddings=32,
                                   tie_word_embeddings=tied)
    single = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), model.tp_plan)  # the whole recipe
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied, "tied weights stay tied"
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    out, ref = model(input_ids=ids, labels=ids), single(input_ids=ids, labels=ids)
    assert_close(out.logits, ref.logits, "logits")
    assert_close(out.loss, ref.loss, "loss")
    out.loss.backward()
    ref.loss.backward()
    for (name, p), r in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), r.grad, f"grad of {name}", scale=3.0)
    return sorted({str(p.placements) for p in model.parameters()})


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
@pytest.mark.parametrize("world", [2, 4])
def test_transformers_llama_with_its_own_tp_plan(pools, world, tied):
    pytest.importorskip("transformers")
    placements = pools.run(world, case_transformers_llama, world, tied)[0]
    assert placements == ["(Replicate(),)", "(Shard(dim=0),)", "(Shard(dim=1),)"]


def case_tied_weights():
    """One Parameter as the embedding and the lm-head: still one after the plan where both splits agree (as in one
    process, its gradient sums both uses); a warning where they do not."""
    torch.manual_seed(0)
    single = Tiny()
    single.lm_head.weight = single.embed_tokens.weight
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), {"embed_tokens": "embedding_rowwise", "lm_head": "colwise_rep"})
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 30, (2, 5))
    model(ids).pow(2).mean().backward()
    single(ids).pow(2).mean().backward()
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), ref.grad, f"grad of {name}")
    apart = copy.deepcopy(single)
    with pytest.warns(UserWarning, match="no longer tied"):
        dtp.parallelize_module(apart, dtp.default_mesh(), {"embed_tokens": "embedding_colwise", "lm_head": "colwise"})


def test_tied_weights_stay_tied(pools):
    pools.run(2, case_tied_weights)


TP_EXPERTS = {"model.layers.*.mlp.experts.gate_up_proj": "packed_colwise",
              "model.layers.*.mlp.experts.down_proj": "rowwise", "model.layers.*.mlp.experts": "moe_tp_experts"}


def case_transformers_moe(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=32, num_experts_per_tok=2)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, **common)
        single = transformers.MixtralForCausalLM(cfg)
    elif kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1, **common)
        single = transformers.Qwen3MoeForCausalLM(cfg)
    else:  # MLA attention (mla_kv_a_proj) and routed + shared experts after one dense layer
        cfg = transformers.DeepseekV2Config(n_routed_experts=4, moe_intermediate_size=32, n_shared_experts=1,
                                            first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, **common)
        single = transformers.DeepseekV2ForCausalLM(cfg)
    model = copy.deepcopy(single)
    plan = dict(model.tp_plan)
    if not any(key.endswith("mlp.experts") for key in plan):  # transformers >= 5.25 leaves the experts to its ep_plan:
        plan.update(TP_EXPERTS)  # the tp entries its plans carried up to 5.24, written out
    dtp.parallelize_module(model, dtp.default_mesh(), plan)  # moe_tp_experts and the packed expert weights
    packed = dtp.packed_layouts(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, eps=1e-6) for m in (model, single)]
    for step in range(3):
        compare_causal_lm_step(model, single, ids, step)
        for (name, p), r in zip(model.named_parameters(), single.parameters()):
            grad = packed[name].unpack(full(p.grad)) if name in packed else full(p.grad)  # the original layout
            assert_close(grad, r.grad, f"step {step} grad of {name}", scale=3.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    return [str(experts.gate_up_proj.placements), str(experts.down_proj.placements)]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "deepseek_v2"])
def test_transformers_moe_with_its_own_tp_plan(pools, kind, world):
    """moe_tp_experts: each rank runs its shard of every expert (gate_up_proj packed colwise, down_proj rowwise), and
    DeepSeek-V2's MLA (mla_kv_a_proj); logits, loss, every gradient and 3 AdamW steps equal one process."""
    pytest.importorskip("transformers")
    placements = pools.run(world, case_transformers_moe, kind)[0]
    assert placements == ["(Shard(dim=1),)", "(Shard(dim=2),)"]

