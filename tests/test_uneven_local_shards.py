"""Plain local tensors declared as shards, uneven: torchtitan's SP plan (use_local_output=True) on sequence 5 over 3
ranks and 7 over 4 equals one process; a split that is not torch.chunk's is a ValueError on every rank, the ranks go
on; after a site's first call the sizes cost no collective."""

import copy

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard

import dtp
from dtp.runtime.local_shards import LocalShardError
from examples.gpt import GPT, GPTConfig

from .reference import TORCH_VERSION, assert_close, full, rank_world, record_collectives


def titan_plan(styles, local=True):
    """torchtitan's SP plan: every Shard(1) output a plain local tensor (use_local_output=True, the default)."""
    C, R, P, S = styles.ColwiseParallel, styles.RowwiseParallel, styles.PrepareModuleInput, styles.SequenceParallel
    gather = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    scatter = dict(output_layouts=Shard(1), use_local_output=local)
    return {"tok_embeddings": R(input_layouts=Replicate(), **scatter), "norm": S(),
            "output": C(input_layouts=Shard(1), output_layouts=Replicate()),
            "layers.*.attention_norm": S(), "layers.*.attention": P(**gather), "layers.*.attention.w[qkv]": C(),
            "layers.*.attention.wo": R(**scatter), "layers.*.ffn_norm": S(), "layers.*.mlp": P(**gather),
            "layers.*.mlp.up": C(), "layers.*.mlp.down": R(**scatter)}


def case_titan_plan_matches(styles_name, seqs):
    """Logits, loss and every gradient equal one process, for each sequence length in turn (lengths change)."""
    _, world = rank_world()
    torch.manual_seed(0)
    single = GPT(GPTConfig(dim=8 * world, n_heads=world, hidden=16 * world, n_layers=1, vocab_size=40, norm="rms"))
    styles = dtp if styles_name == "dtp" else torch_tp
    tp = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), titan_plan(styles))
    params = dict(tp.named_parameters())
    for seq in seqs:
        ids = torch.randint(0, 40, (2, seq))
        losses = []
        for model in (single, tp):
            model.zero_grad()
            logits = model(ids)
            assert type(logits) is torch.Tensor and logits.shape == (2, seq, 40)
            loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
            loss.backward()
            losses.append((logits, loss))
        assert_close(losses[1][0], losses[0][0], f"{styles_name} seq {seq}: logits")
        assert_close(losses[1][1], losses[0][1], f"{styles_name} seq {seq}: loss")
        for name, p in single.named_parameters():
            assert_close(full(params[name].grad), p.grad, f"{styles_name} seq {seq}: grad of {name}", scale=3.0)


@pytest.mark.parametrize("styles_name", ["dtp", "torch"])
def test_titan_sp_plan_on_uneven_sequences_matches_one_process(pools, styles_name):
    pools.run(3, case_titan_plan_matches, styles_name, (5, 6, 4, 7))  # 2,2,1; 2,2,2; 2,2,0; 3,3,1 (wider)
    pools.run(4, case_titan_plan_matches, styles_name, (7,))  # 2,2,2,1


class Gathered(nn.Module):
    """A module whose input PrepareModuleInput gathers: a linear on the whole sequence."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return self.proj(x).cumsum(1)  # mixes the sequence: a wrong gather shows


class Doubled(nn.Linear):
    """An nn.Linear subclass with a forward of its own (it runs on DTensors, as a LoRA layer does)."""

    def forward(self, x):
        return 2 * super().forward(x)


def case_declared_plain_shards():
    """User-split torch.chunk inputs declared Shard(d) (PrepareModuleInput, ColwiseParallel, a subclass forward,
    SequenceParallel, batch-split embedding ids, vocab-split logits) equal one process: values and input grads."""
    rank, world = rank_world()
    mesh = dtp.default_mesh()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    mine = lambda t, d: t.chunk(world, d)[rank] if rank < len(t.chunk(world, d)) else t.narrow(d, 0, 0)
    cases = {
        "prepare": (Gathered(), lambda s: {"": s.PrepareModuleInput(
            input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_output=True)}, 1),
        "colwise": (nn.Linear(6, 4 * world), lambda s: {"": s.ColwiseParallel(input_layouts=Shard(1),
                                                                                output_layouts=Replicate())}, 1),
        "sequence": (nn.LayerNorm(6), lambda s: {"": s.SequenceParallel()}, 1),
        "subclass": (Doubled(6, 4 * world), lambda s: {"": s.ColwiseParallel(input_layouts=Shard(1),
                                                                               output_layouts=Replicate())}, 1),
    }
    for what, (module, plan, dim) in cases.items():
        if what == "subclass" and TORCH_VERSION < (2, 8):  # torch 2.7's DTensor, under torch's own style too
            for styles in (dtp, torch_tp):
                with pytest.raises(RuntimeError, match="view size is not compatible"):
                    dtp.parallelize_module(copy.deepcopy(module), mesh, plan(styles))(mine(x, dim).clone())
            continue
        expected_x = x.clone().requires_grad_()
        expected = module(expected_x)
        expected.square().sum().backward()
        for styles in (dtp, torch_tp):
            local = mine(x, dim).clone().requires_grad_()
            y = dtp.parallelize_module(copy.deepcopy(module), mesh, plan(styles))(local)
            if what == "sequence":  # torch's even guess of the global shape, marked for dtp's collectives
                y.to_local().square().sum().backward()
                assert_close(y.to_local(), mine(expected, dim), f"{what}: this rank's output")
            else:
                assert_close(full(y), expected, f"{what}: output")
                full(y).square().sum().backward()
            assert_close(local.grad, mine(expected_x.grad, dim), f"{what}: this rank's input grad")
    ids = torch.randint(0, 12, (5, 3))
    emb = nn.Embedding(12, 4 * world)
    y = dtp.parallelize_module(copy.deepcopy(emb), mesh, dtp.RowwiseParallel(input_layouts=Shard(0)))(mine(ids, 0))
    assert_close(full(y), emb(ids), "embedding on batch-split ids")
    logits, target = torch.randn(4, 5, 10, requires_grad=True), torch.randint(0, 10, (4, 5))
    local = mine(logits.detach(), -1).clone().requires_grad_()  # vocab 10: 4, 4, 2, no vocab_size= needed
    loss = dtp.vocab_parallel_cross_entropy(local, target, device_mesh=mesh)
    expected = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    expected.backward()
    assert_close(loss, expected, "cross entropy on plain uneven logits")
    assert_close(local.grad, mine(logits.grad, -1), "cross entropy: this rank's logits grad")


def test_declared_plain_shards_are_exact_when_uneven(pools):
    pools.run(3, case_declared_plain_shards)  # 2, 2, 1


def case_bad_splits_named_on_every_rank():
    """Not torch.chunk's split (first call or a later one), or other dims that differ: LocalShardError naming the
    module, every rank's sizes and the fix; the ranks go on."""
    rank, world = rank_world()
    mesh = dtp.default_mesh()
    model = dtp.parallelize_module(Gathered(), mesh, dtp.PrepareModuleInput(
        input_layouts=Shard(1), desired_input_layouts=Replicate(), use_local_output=True))
    col = dtp.parallelize_module(nn.Linear(6, 6), mesh, torch_tp.ColwiseParallel(input_layouts=Shard(1)))
    messages = []
    for module, shape in ((model, (2, (1, 2, 2)[rank], 6)), (None, None), (model, (2, (2, 1, 2)[rank], 6)),
                          (col, (1 + rank, 2, 6))):
        if module is None:  # a good call between: the next bad split is found in the sizes its all-gather carries
            assert model(torch.randn(2, 2, 6)).shape == (2, 2 * world, 6)
            continue
        with pytest.raises(LocalShardError) as info:
            module(torch.randn(shape))
        messages.append(str(info.value))
    assert isinstance(info.value, ValueError)
    for m, sizes, chunks in ((messages[0], "1, 2, 2", "(2, 2, 1)"), (messages[1], "2, 1, 2", "(2, 2, 1)")):
        assert "PrepareModuleInput(''" in m and f"{sizes} along dim 1" in m and chunks in m, m
        assert "use_local_output=False" in m and "divisible by tp=3" in m, m
    assert "ColwiseParallel(''" in messages[2] and "(1, 2, 6), (2, 2, 6), (3, 2, 6)" in messages[2], messages[2]
    assert model(torch.randn(2, 2, 6)).shape == (2, 2 * world, 6)  # the ranks go on
    return messages


def test_bad_splits_are_a_value_error_on_every_rank(pools):
    messages = pools.run(3, case_bad_splits_named_on_every_rank)
    assert len({tuple(m) for m in messages}) == 1, "the same messages on every rank"


def _kinds(calls):
    return {kind: sum(1 for k, _ in calls if k == kind) for kind, _ in calls}


def case_collective_counts():
    """Plain Shard(1) residuals (torchtitan's plan) issue the collectives of DTensor residuals: a site's first call
    adds one all-gather of 9 ints (every rank's shape), later calls none."""
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (2, 5))
    counts = {}
    for name, local in (("plain", True), ("dtensor", False)):
        model = dtp.parallelize_module(GPT(GPTConfig(n_layers=2)), dtp.default_mesh(), titan_plan(dtp, local))
        for step in (1, 2):
            logits, fwd = record_collectives(lambda: model(ids))
            _, bwd = record_collectives(lambda: logits.sum().backward())
            shapes = sum(1 for kind, n in fwd + bwd if kind == "all_gather" and n == 9)
            counts[name, step] = (_kinds(fwd), _kinds(bwd), shapes)
    return counts


def test_plain_shards_cost_no_collective_after_the_first_call(pools):
    counts = pools.run(2, case_collective_counts)[0]
    fwd, bwd, _ = counts["dtensor", 2]
    assert counts["plain", 2] == (fwd, bwd, 0) and counts["dtensor", 1] == (fwd, bwd, 0), counts
    first = dict(fwd, all_gather=fwd["all_gather"] + 5)  # PrepareModuleInput x 2 x 2 blocks, output: once each
    assert counts["plain", 1] == (first, bwd, 5), counts
