"""nn.Linear / nn.Embedding subclasses with a forward of their own (LoRA adapters) keep it under a plan, as in torch."""

import copy

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import dtp

from .reference import assert_close


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


class LoRALinear(nn.Linear):
    """y = x Wᵀ + b + (x Aᵀ) Bᵀ with a frozen base weight W and trainable A (r x in), B (out x r)."""

    def __init__(self, in_features, out_features, r=2):
        super().__init__(in_features, out_features)
        self.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, in_features) * 0.1)
        self.B = nn.Parameter(torch.randn(out_features, r) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.A), self.B)


class NestedLoRALinear(nn.Linear):
    """peft-style: the adapter as two child nn.Linear modules (torch's ColwiseParallel cannot split this one)."""

    def __init__(self, in_features, out_features, r=2):
        super().__init__(in_features, out_features)
        self.weight.requires_grad_(False)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x))


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 2.0


def mlp(cls):
    return nn.Sequential(ScaledEmbedding(20, 8), cls(8, 12), nn.ReLU(), cls(12, 8))


def plan(styles):
    return {"0": styles.RowwiseParallel(input_layouts=torch.distributed.tensor.Replicate()),
            "1": styles.ColwiseParallel(), "3": styles.RowwiseParallel()}


def step(model, ids):
    y = model(ids)
    y.pow(2).mean().backward()
    return full(y)


def case_lora(kind):
    torch.manual_seed(0)
    cls = LoRALinear if kind == "direct" else NestedLoRALinear
    single = mlp(cls)
    mesh = dtp.default_mesh()
    ours = dtp.parallelize_module(copy.deepcopy(single), mesh, plan(dtp))
    ids = torch.randint(0, 20, (3, 5))
    y = step(ours, ids)
    assert_close(y, step(single, ids), "output")
    trainable = {n for n, p in single.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == trainable, "frozen stay frozen"
    for (name, p), ref in zip(ours.named_parameters(), single.parameters()):
        assert (p.grad is None) == (ref.grad is None), name
        if ref.grad is not None:
            assert_close(full(p.grad), ref.grad, f"grad of {name}")
    if kind == "direct":  # torch splits this one too: the same values and the same placements
        theirs = torch_tp.parallelize_module(copy.deepcopy(single), mesh, plan(torch_tp))
        assert_close(step(theirs, ids), y, "dtp vs torch output")
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert p.placements == q.placements, name
            if p.grad is not None:  # (torch 2.7's styles unfreeze the base weight: it then has a gradient there)
                assert_close(full(p.grad), full(q.grad), f"dtp vs torch grad of {name}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", ["direct", "nested"])
def test_lora_subclass_keeps_its_forward(pools, world, kind):
    pools.run(world, case_lora, kind)


def test_from_linear_refuses_a_subclass_forward(pools):
    pools.run(2, _from_linear_refuses)


def _from_linear_refuses():
    with pytest.raises(TypeError, match="LoRALinear has its own forward"):
        dtp.ColumnParallelLinear.from_linear(LoRALinear(4, 4))


class NormedEmbedding(nn.Embedding):
    """Inkling's embedding: a norm right after the lookup, inside its own forward."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__(num_embeddings, embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim)

    def forward(self, ids):
        return self.norm(super().forward(ids))


def case_normed_embedding(output):
    """Vocab rows split: the subclass's own norm sees the reduced lookup (DTensor alone would reach it as a pending
    masked sum and fail), Replicate or sequence-scattered, with the values and gradients of one process."""
    from torch.distributed.tensor import Replicate, Shard

    torch.manual_seed(0)
    single = NormedEmbedding(20, 8)
    with torch.no_grad():
        single.norm.weight.uniform_(0.5, 1.5)
        single.norm.bias.uniform_(-0.5, 0.5)
    layout = Replicate() if output == "replicate" else Shard(1)
    ours = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(),
                                  {"": dtp.VocabParallel(output_layouts=layout, use_local_output=False)})
    ids = torch.randint(0, 20, (3, 8), generator=torch.Generator().manual_seed(1))
    y = ours(ids)
    assert isinstance(y, DTensor) and y.placements == (layout,), y
    assert_close(step(ours, ids), step(single, ids), "output")
    for (name, p), ref in zip(ours.named_parameters(), single.parameters()):
        assert_close(full(p.grad), ref.grad, f"grad of {name}")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("output", ["replicate", "sequence"])
def test_embedding_subclass_normalizing_after_a_vocab_parallel_lookup(pools, world, output):
    pools.run(world, case_normed_embedding, output)
