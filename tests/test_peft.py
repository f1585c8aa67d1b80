"""peft LoRA under dtp: a peft model parallelized with its base model's own tp_plan (keys with or without peft's
`base_model.model.` prefix) equals single-process peft (logits, loss, LoRA gradients, 3 AdamW steps, merged weights);
peft applied after dtp is refused with the fix. Tiny models from configs, no download."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp

from .reference import assert_close, compare_causal_lm_step

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=32)
ADAPTERS = {  # kind: (model, LoraConfig options, whether the plan's keys carry peft's prefix)
    "dense": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"]), False),
    "dense-all": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj", "embed_tokens"], modules_to_save=["lm_head"]), True),
    "moe": ("qwen3_moe", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]), True),
}


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def tiny(model, **config):
    torch.manual_seed(0)
    if model == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**COMMON, "attention_bias": True, **config}))
    cfg = transformers.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1,
                                      num_experts_per_tok=2, **COMMON)
    return transformers.Qwen3MoeForCausalLM(cfg)


def lora(bare, **options):
    """peft's LoRA with nonzero lora_B (init_lora_weights=False), so a wrong split shows in the logits."""
    torch.manual_seed(1)
    return peft.get_peft_model(bare, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))


def case_lora_equals_single_process(kind):
    model_name, options, prefixed = ADAPTERS[kind]
    bare = tiny(model_name)
    plan = {("base_model.model." if prefixed else "") + k: v for k, v in bare.tp_plan.items()}
    single = lora(bare, **options)
    model = copy.deepcopy(single)
    dtp.parallelize_module(model, dtp.default_mesh(), plan)
    params = dict(model.named_parameters())
    assert all(not p.requires_grad for n, p in params.items() if "lora_" not in n and "modules_to_save" not in n), \
        "frozen base weights stay frozen"
    trainable = [(n, p) for n, p in params.items() if p.requires_grad]
    assert trainable and all(isinstance(p, DTensor) for _, p in trainable)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(2))
    refs = [p for p in single.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW(ps, lr=1e-2, eps=1e-6) for ps in ([p for _, p in trainable], refs)]
    for step in range(3):
        compare_causal_lm_step(model, single, ids, step)
        for (name, p), r in zip(trainable, refs):
            assert_close(full(p.grad), r.grad, f"step {step} grad of {name}", scale=3.0)
        assert all(p.grad is None for p in params.values() if not p.requires_grad)
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    layouts = {n.split("layers.0.")[1].replace(".default", ""): str(p.placements) for n, p in trainable
               if "layers.0." in n and ("q_proj" in n or "down_proj" in n or "o_proj" in n)}
    merged, ref_merged = model.merge_and_unload(), single.merge_and_unload()  # the trained adapters folded in
    state, expected = dtp.full_state_dict(merged), ref_merged.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(state[name], value, f"merged {name}")
    assert_close(merged(input_ids=ids).logits, ref_merged(input_ids=ids).logits, "merged logits")
    return layouts


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_lora_under_the_base_models_plan_equals_single_process(pools, kind, world):
    """Column splits (q/k/v, gate/up, lm_head) split lora_B by rows and keep lora_A whole; row splits (o, down) split
    lora_A by columns and keep lora_B whole; a LoRA embedding under embedding_rowwise and a modules_to_save copy too."""
    layouts = pools.run(world, case_lora_equals_single_process, kind)[0]
    assert layouts["self_attn.q_proj.lora_A.weight"] == str((Replicate(),))
    assert layouts["self_attn.q_proj.lora_B.weight"] == str((Shard(0),))
    row = "mlp.down_proj" if kind == "dense" else "self_attn.o_proj"
    assert layouts[f"{row}.lora_A.weight"] == str((Shard(1),))
    assert layouts[f"{row}.lora_B.weight"] == str((Replicate(),))


def case_peft_after_dtp_is_refused():
    mesh = dtp.default_mesh()
    bare = tiny("llama")
    dtp.parallelize_module(bare, mesh, bare.tp_plan)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj'.*Apply peft first, then dtp"):
        lora(bare, target_modules=["q_proj"])
    model = lora(tiny("llama"), target_modules=["q_proj", "o_proj"])  # peft first: the recipe
    dtp.parallelize_module(model, mesh, model.base_model.model.tp_plan)
    with pytest.raises(ValueError, match=r"adapter 'second'.*before dtp.parallelize_module"):
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
    dora = lora(tiny("llama"), target_modules=["v_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"'base_model.model.model.layers.0.self_attn.v_proj'.*LoRA variants"):
        dtp.parallelize_module(dora, mesh, dora.base_model.model.tp_plan)
    assert not isinstance(dora.base_model.model.model.layers[0].self_attn.v_proj.base_layer.weight, DTensor), \
        "refused before anything changed"
    three_heads = lora(tiny("llama", hidden_size=24, num_attention_heads=3, num_key_value_heads=3),
                       target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"q_proj.base_layer.*would have a head cut"):  # as without the adapter
        dtp.parallelize_module(three_heads, mesh, three_heads.base_model.model.tp_plan)


def test_peft_after_dtp_is_refused_with_the_fix(pools):
    """get_peft_model on a parallelized model, an adapter added after the split, a DoRA layer and a LoRA layer whose
    base would have a head cut all raise, naming the module (and what to do instead); nothing is silently wrong."""
    pools.run(2, case_peft_after_dtp_is_refused)


def case_plan_keys():
    model = lora(tiny("llama"), target_modules=["q_proj", "down_proj"])
    bare_plan = model.base_model.model.tp_plan
    mesh = dtp.default_mesh()
    explained = [dtp.explain_plan(model, bare_plan, mesh),
                 dtp.explain_plan(model, {"base_model.model." + k: v for k, v in bare_plan.items()}, mesh),
                 {"base_model." + k: v for k, v in dtp.explain_plan(model.base_model, bare_plan, mesh).items()},
                 {"base_model." + k: v for k, v in
                  dtp.explain_plan(model.base_model, {"model." + k: v for k, v in bare_plan.items()}, mesh).items()}]
    assert all(e == explained[0] for e in explained), "a PeftModel's or a LoraModel's keys, with or without prefix"
    assert explained[0]["base_model.model.model.layers.1.mlp.down_proj.lora_A.default"] == dtp.RowwiseParallel()
    with pytest.raises(ValueError, match="both name 'base_model.model.lm_head'"):
        dtp.explain_plan(model, {"lm_head": "colwise_rep", "base_model.model.lm_head": "colwise_rep"}, mesh)


def test_plan_keys_with_or_without_the_peft_prefix(pools):
    """The bare model's keys, or the same keys under base_model.model. (PeftModel) or model. (LoraModel), give one
    plan."""
    pools.run(2, case_plan_keys)


class Block(nn.Module):
    """A fused gate_up projection between sequence-parallel norms: packed column split on a sequence-sharded input,
    row split reduce-scattered back onto the sequence."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.gate_up, self.down = nn.Linear(16, 64), nn.Linear(32, 16)

    def forward(self, x):
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def case_lora_on_sequence_shards():
    torch.manual_seed(0)
    single = lora(Block(), target_modules=["gate_up", "down"], lora_bias=True)
    model = copy.deepcopy(single)
    mesh = dtp.default_mesh()
    plan = {"norm": "sequence_parallel", "gate_up": dtp.PackedColwiseParallel(blocks=2, input_layouts=Shard(1)),
            "down": dtp.RowwiseParallel(output_layouts=Shard(1))}
    for _ in range(2):  # applying the plan again changes nothing
        dtp.parallelize_module(model, mesh, plan)
    rank, world = mesh.get_local_rank(), mesh.size()
    x = torch.randn(2, 4 * world, 16, generator=torch.Generator().manual_seed(3))
    local = x.chunk(world, dim=1)[rank]
    out, ref = model(local), single(x)
    assert_close(out, ref.chunk(world, dim=1)[rank], "output on this rank's sequence shard")
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    refs = [p for p in single.parameters() if p.requires_grad]
    packed = dtp.packed_layouts(model)
    for (name, p), r in zip(trainable, refs):
        grad = packed[name].unpack(full(p.grad)) if name in packed else full(p.grad)
        assert_close(grad, r.grad, f"grad of {name}", scale=3.0)
    state, expected = dtp.full_state_dict(model.merge_and_unload()), single.merge_and_unload().state_dict()
    for name, value in expected.items():
        assert_close(state[name], value, f"merged {name}")
    return {n: str(p.placements) for n, p in trainable}


def test_lora_on_sequence_shards_and_a_packed_projection(pools):
    """The whole LoRA factor on a sequence shard gets its gradient all-reduced; a packed column split packs lora_B
    alike; lora_B's bias (lora_bias=True) follows its weight."""
    placements = pools.run(2, case_lora_on_sequence_shards)[0]
    assert placements["base_model.model.gate_up.lora_B.default.bias"] == str((Shard(0),))
    assert placements["base_model.model.down.lora_B.default.bias"] == str((Replicate(),))
