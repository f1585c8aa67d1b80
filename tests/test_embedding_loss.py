"""Vocab-parallel embedding and vocab-parallel cross entropy against nn.Embedding and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Replicate, Shard

import dtp
from dtp.runtime.sharding import local_slice
from dtp.runtime.conversions import from_local

from .reference import assert_close, assert_shard_close, count_collectives, rank_world


def case_vocab_embedding(vocab, dim, padding_idx, layout, seq):
    """Output and weight gradient equal nn.Embedding's; padding row gets no gradient; ids outside a rank's rows give 0."""
    rank, world = rank_world()
    torch.manual_seed(0)
    ref = nn.Embedding(vocab, dim, padding_idx=padding_idx)
    emb = dtp.VocabParallelEmbedding.from_embedding(ref, output_layout=layout)
    assert emb.weight.placements == (Shard(0),)
    ids = torch.randint(0, vocab, (3, seq))
    if padding_idx is not None:
        ids[0, 0] = padding_idx % vocab
    g = torch.randn(3, seq, dim)
    y_ref = ref(ids)
    (y_ref * g).sum().backward()
    y, counts = count_collectives(lambda: emb(ids))
    assert type(y) is torch.Tensor and y.grad_fn is not None
    if isinstance(layout, Shard):
        assert counts == {"reduce_scatter": 1}
        assert_close(y, local_slice(y_ref, Shard(1), world, rank), "embedding output (sequence shard)")
        (y * local_slice(g, Shard(1), world, rank)).sum().backward()
    else:
        assert counts == {"all_reduce": 1}
        assert_close(y, y_ref, "embedding output")
        (y * g).sum().backward()
    assert_shard_close(emb.weight.grad, ref.weight.grad, Shard(0), "embedding weight grad")
    if padding_idx is not None:
        assert torch.count_nonzero(ref.weight.grad[padding_idx]) == 0


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("layout", [Replicate(), Shard(1)], ids=["replicate", "sequence"])
def test_vocab_parallel_embedding(pools, world, layout):
    # vocab 11 is uneven over 2, 3 and 4 ranks; seq 5 is uneven too
    pools.run(world, case_vocab_embedding, 11, 6, 4, layout, 5)
    pools.run(world, case_vocab_embedding, 12, 4, None, layout, 4)


def case_column_embedding():
    torch.manual_seed(0)
    ref = nn.Embedding(10, 8)
    model = nn.Sequential(nn.Embedding(10, 8))
    model[0].load_state_dict(ref.state_dict())
    dtp.parallelize_module(model, None, {"0": dtp.ColwiseParallel(output_layouts=Replicate())})
    ids = torch.randint(0, 10, (2, 3))
    y = model(ids)
    assert_close(y, ref(ids), "embedding split by dim")
    y.pow(2).sum().backward()
    ref(ids).pow(2).sum().backward()
    assert_shard_close(model[0].weight.grad, ref.weight.grad, Shard(1), "dim-split embedding grad")


def test_embedding_split_by_dim(pools):
    pools.run(2, case_column_embedding)


def case_ids_outside_vocab():
    emb = dtp.VocabParallelEmbedding(10, 4)
    messages = []
    for bad in (10, -1):
        ids = torch.tensor([[1, bad]])
        with pytest.raises(IndexError) as info:
            emb(ids)
        assert f"token id {bad}" in str(info.value) and "[0, 10)" in str(info.value)
        messages.append(str(info.value))
    return messages


def test_ids_outside_vocab_error_on_every_rank(pools):
    per_rank = pools.run(4, case_ids_outside_vocab)
    assert all(m == per_rank[0] for m in per_rank)


def case_cross_entropy(vocab, shape, reduction, smoothing, ignore, dtensor, mesh_2d):
    """Value and logits gradient equal F.cross_entropy's on the gathered logits."""
    rank, world = rank_world()
    mesh = dtp.init_mesh(tp=2, dp=world // 2) if mesh_2d else dtp.default_mesh()
    tp_mesh = mesh["tp"] if mesh_2d else mesh
    tp_rank, tp = tp_mesh.get_local_rank(), tp_mesh.size()
    torch.manual_seed(0)
    logits_full = torch.randn(*shape, vocab) * 3
    target = torch.randint(0, vocab, shape)
    if ignore:
        target.view(-1)[::3] = -100
    ref_logits = logits_full.clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, -2), target.flatten(), reduction=reduction,
                          label_smoothing=smoothing)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    local = local_slice(logits_full, Shard(-1), tp, tp_rank).clone().requires_grad_()
    if dtensor:
        logits = from_local(local, tp_mesh, Shard(len(shape)), logits_full.shape)
        loss, counts = count_collectives(lambda: dtp.vocab_parallel_cross_entropy(
            logits, target, reduction=reduction, label_smoothing=smoothing))
    else:
        loss, counts = count_collectives(lambda: dtp.vocab_parallel_cross_entropy(
            local, target, device_mesh=mesh, vocab_size=vocab, reduction=reduction, label_smoothing=smoothing))
    assert counts == {"all_reduce": 2}, counts  # one MAX, one stacked SUM; the logits are never gathered
    assert type(loss) is torch.Tensor
    assert_close(loss.reshape(ref.shape), ref, "loss")
    _, back = count_collectives(lambda: (loss.reshape(ref.shape) * g).sum().backward())
    assert back == {}
    assert_close(local.grad, local_slice(ref_logits.grad, Shard(-1), tp, tp_rank), "logits grad")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_vocab_parallel_cross_entropy(pools, world, reduction, smoothing):
    pools.run(world, case_cross_entropy, 13, (4, 5), reduction, smoothing, True, True, False)


@pytest.mark.parametrize("dtensor", [True, False], ids=["dtensor", "local"])
def test_cross_entropy_1d_logits_and_2d_mesh(pools, dtensor):
    pools.run(4, case_cross_entropy, 12, (6,), "mean", 0.1, False, dtensor, True)
    pools.run(2, case_cross_entropy, 12, (6,), "mean", 0.0, True, dtensor, False)
