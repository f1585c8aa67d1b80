"""The GPT example parallelized only through its plan: logits, loss, every gradient and AdamW steps equal the single process."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

import dtp
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import assert_close, count_collectives, record_collectives


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _step(model, ids, targets, parallel):
    logits = model(ids)
    if parallel:
        assert isinstance(logits, DTensor) and logits.placements == (Shard(2),), logits
        loss = dtp.vocab_parallel_cross_entropy(logits, targets)
    else:
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    return logits, loss


def case_transformer_matches(sp, cfg_kwargs, batch, seq, steps, dtype_name="float32", seed=0, after_steps=True):
    """Same logits, loss and per-parameter gradients (gathered to full), then the same parameters after AdamW steps.

    Several AdamW steps are compared in float64: Adam's first steps move every parameter by about
    ±lr whatever the gradient's size, so float32 rounding noise on a near-zero gradient (which two
    single-process runs with different summation orders show as well) would flip whole steps.
    """
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    cfg = GPTConfig(**cfg_kwargs)
    single = GPT(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norm parameters, so their gradients are checked for real
        for name, p in single.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    tp = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), tp_plan(sp))
    tp_params = dict(tp.named_parameters())
    assert set(tp_params) == {n for n, _ in single.named_parameters()}
    assert all(isinstance(p, DTensor) for p in tp_params.values()), "every parameter is a DTensor"
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-2)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-2)
    for step in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (batch, seq))
        targets = torch.randint(0, cfg.vocab_size, (batch, seq))
        logits_ref, loss_ref = _step(single, ids, targets, parallel=False)
        logits, loss = _step(tp, ids, targets, parallel=True)
        assert type(loss) is torch.Tensor
        assert_close(full(logits), logits_ref, f"step {step} logits", dtype)
        assert_close(loss, loss_ref, f"step {step} loss", dtype)
        for name, p in single.named_parameters():
            assert_close(full(tp_params[name].grad), p.grad, f"step {step} grad of {name}", dtype, scale=3.0)
        opt_single.step()
        opt_tp.step()
        opt_single.zero_grad()
        opt_tp.zero_grad()
    if dtype == torch.float64 and after_steps:
        for name, p in single.named_parameters():
            assert_close(full(tp_params[name]), p, f"{name} after {steps} AdamW steps", dtype, scale=10.0)


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_transformer_matches_single_process(pools, world, sp):
    pools.run(world, case_transformer_matches, sp, dict(), 2, 8, 1, "float32")  # float32 tolerance
    pools.run(world, case_transformer_matches, sp, dict(), 2, 8, 4, "float64")  # then 4 AdamW steps


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_transformer_uneven_vocab_and_sequence_rmsnorm(pools, sp):
    # vocab 30 and sequence 7 over 4 ranks: shards 8,8,8,6 and 2,2,2,1
    pools.run(4, case_transformer_matches, sp, dict(vocab_size=30, norm="rms", bias=False), 2, 7, 1, "float32")
    pools.run(4, case_transformer_matches, sp, dict(vocab_size=30, norm="rms", bias=False), 2, 7, 3, "float64")


def _block_step_counts(sp, n_layers):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=n_layers)
    model = dtp.parallelize_module(GPT(cfg), dtp.default_mesh(), tp_plan(sp))
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, fwd = count_collectives(lambda: model(ids))
    loss = dtp.vocab_parallel_cross_entropy(logits, ids)
    _, bwd = count_collectives(lambda: loss.backward())
    _, calls = record_collectives(lambda: dtp.vocab_parallel_cross_entropy(model(ids), ids).backward())
    return fwd, bwd, calls


def case_counts_per_block(sp):
    """Collectives of one transformer block per training step: the difference between 2 and 1 blocks."""
    fwd1, bwd1, _ = _block_step_counts(sp, 1)
    fwd2, bwd2, calls = _block_step_counts(sp, 2)
    per_block = lambda a, b: {k: b[k] - a[k] for k in set(a) | set(b) if b[k] - a[k]}
    all_reduce_sizes = [n for op, n in calls if op == "all_reduce"]
    return per_block(fwd1, fwd2), per_block(bwd1, bwd2), all_reduce_sizes


def test_collectives_per_block_without_sequence_parallel(pools):
    fwd, bwd, _ = pools.run(2, case_counts_per_block, False)[0]
    assert fwd == {"all_reduce": 2}  # after attention.wo and mlp.down
    assert bwd == {"all_reduce": 2}  # the attention and mlp input gradients, once each (not per projection)


def test_collectives_per_block_with_sequence_parallel(pools):
    fwd, bwd, all_reduce_sizes = pools.run(2, case_counts_per_block, True)[0]
    assert fwd == {"all_gather": 2, "reduce_scatter": 2}
    # backward: the mirror image; the LayerNorm parameters' gradients stay Partial (torch's SequenceParallel
    # semantics), reduced where they are read: by the optimizer step, clip_grad_norm_, FSDP2 or full_tensor
    assert bwd == {"all_gather": 2, "reduce_scatter": 2}
    activation = 2 * 8 * GPTConfig().dim  # batch x seq x dim elements
    assert all_reduce_sizes and max(all_reduce_sizes) < activation, \
        f"an all-reduce moved activations: sizes {all_reduce_sizes}"
