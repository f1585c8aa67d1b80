"""Edge inputs: empty batches through every layer, style and the shim; a wrong input width; per-rank head counts."""

import copy

import pytest
import torch
from torch import nn

import dtp
import parallel_linear
from examples.gpt import GPT, GPTConfig, tp_plan
from examples.llama import Llama, LlamaConfig, apply_tp

from .reference import assert_close, expect_errors, full


def _zero_grads(module, what):
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and not full(p.grad).any(), f"{what}: {name} should get a zero gradient"
            p.grad = None


def case_empty_batches():
    tp = dtp.default_mesh().size()
    shapes = []
    for lead in ((0,), (2, 0)):
        x = torch.randn(*lead, 8, requires_grad=True)
        layers = [(dtp.ColumnParallelLinear(8, 10), 10), (dtp.ColumnParallelLinear(8, 10, gather_output=False), None),
                  (dtp.RowParallelLinear(8, 10), 10), (parallel_linear.ColumnParallelLinear(8, 10 * tp), 10 * tp)]
        for layer, width in layers:
            y = layer(x)
            assert y.shape[:-1] == x.shape[:-1] and (width is None or y.shape[-1] == width), (type(layer), y.shape)
            y.sum().backward()
            assert x.grad.shape == x.shape and not x.grad.any()
            x.grad = None
            _zero_grads(layer, type(layer).__name__)
        row = parallel_linear.RowParallelLinear(8 * tp, 10)
        y = row(torch.randn(*lead, 8, requires_grad=True))
        assert y.shape == lead + (10,)
        y.sum().backward()
        _zero_grads(row, "parallel_linear.RowParallelLinear")
        ids = torch.zeros(lead, dtype=torch.long)
        emb = dtp.VocabParallelEmbedding(30, 8)
        y = emb(ids)
        assert y.shape == lead + (8,)
        y.sum().backward()
        _zero_grads(emb, "VocabParallelEmbedding")
    for sp in (False, True):  # every style of the GPT plan, with and without sequence parallel
        model = dtp.parallelize_module(GPT(GPTConfig()), None, tp_plan(sp))
        logits = model(torch.zeros(0, 8, dtype=torch.long))
        assert tuple(logits.shape) == (0, 8, 96), logits.shape
        shapes.append(tuple(logits.shape))
        logits.to_local().sum().backward()
        _zero_grads(model, f"GPT sp={sp}")
    loss = dtp.vocab_parallel_cross_entropy(torch.randn(0, 30).requires_grad_(), torch.zeros(0, dtype=torch.long),
                                            device_mesh=dtp.default_mesh(), vocab_size=30 * tp, reduction="sum")
    assert loss.item() == 0.0
    return shapes


@pytest.mark.parametrize("world", [2, 4])
def test_empty_batches_give_nn_shapes_and_zero_gradients(pools, world):
    pools.run(world, case_empty_batches)


def case_width_errors():
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
    dtp.parallelize_module(model, None, {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()})
    col, row = dtp.ColumnParallelLinear(8, 12), dtp.RowParallelLinear(12, 8, input_is_parallel=True)
    return expect_errors([
        (ValueError, lambda: col(torch.randn(3, 5)),
         ["ColumnParallelLinear: input last dim is 5 but the full input must have 8 features (in_features=8)"]),
        (ValueError, lambda: model[0](torch.randn(3, 5)),
         ["ColwiseParallel('0'): input last dim is 5 but the full input must have 8 features (in_features=8)"]),
        (ValueError, lambda: row(torch.randn(3, 5)),
         ["RowParallelLinear: input last dim is 5 but this rank's slice of the input", "must have 6 features"]),
        (ValueError, lambda: model[2](torch.randn(3, 5)), ["RowwiseParallel('2'): input last dim is 5"]),
    ])


def test_column_names_a_wrong_width_as_row_does(pools):
    per_rank = pools.run(2, case_width_errors)
    assert per_rank[0][:2] == per_rank[1][:2]  # Row's messages name each rank's own slice


def case_per_rank_head_counts():
    """PyTorch's TP example sets per-rank n_heads / n_kv_heads before it parallelizes; a real cut is still refused."""
    mesh = dtp.default_mesh()
    tp = mesh.size()
    torch.manual_seed(0)
    single = Llama(LlamaConfig(n_heads=8, n_kv_heads=4))
    model = copy.deepcopy(single)
    for block in model.layers.values():
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp
    apply_tp(model, mesh, loss_parallel=False, enable_sp=False, styles=dtp)
    ids = torch.randint(0, 96, (2, 8))
    assert_close(model(ids), single(ids), "per-rank head counts")
    with pytest.raises(ValueError) as info:  # 2 kv heads over 4 ranks: each would hold half a head
        apply_tp(Llama(LlamaConfig(n_heads=8, n_kv_heads=2)), mesh, loss_parallel=False, enable_sp=False, styles=dtp)
    assert all(s in str(info.value) for s in ("'attention.wk'", "n_kv_heads=2", "head_dim=8", "tp size 4"))
    return str(info.value)


def test_head_counts_global_or_per_rank(pools):
    pools.run(4, case_per_rank_head_counts)
