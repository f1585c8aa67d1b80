"""Torch's own contracts on dtp's hot path: torch.save of state dicts (weights_only reload, as torch TP), exact double
backward (a gradient penalty against one process, gradgradcheck in float64), `.grad` by AccumulateGrad's rules
(in-place accumulation a held reference sees, grad_dtype), and no warning in a plain training step."""

import copy
import io
import warnings

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.func import functional_call

import dtp
from dtp.runtime.mappings import split_to
from dtp.runtime.collectives import axis_of, chunk_sizes
from dtp.runtime.conversions import from_local
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import TORCH_VERSION, assert_close, full


def close64(actual, expected, what):
    """float64 values equal to 1e-9 (relative to the magnitude), compared in float64."""
    assert not isinstance(actual, DTensor), what
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


# -- torch.save / torch.load(weights_only=True) of model and optimizer state dicts ---------------------------------

def _trained_gpt(styles, sp, steps=2):
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    plan = tp_plan(sequence_parallel=sp, styles=dtp if styles == "dtp" else torch_tp)
    dtp.parallelize_module(model, dtp.default_mesh(), plan) if styles == "dtp" else \
        torch_tp.parallelize_module(model, dtp.default_mesh(), plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        full(model(ids)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, ids


def _saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def case_state_dicts_pickle(styles, sp):
    model, opt, ids = _trained_gpt(styles, sp)
    model_file, opt_file = _saved(model.state_dict()), _saved(opt.state_dict())
    fresh, fresh_opt, _ = _trained_gpt(styles, sp, steps=0)
    fresh.load_state_dict(torch.load(model_file, weights_only=True))
    fresh_opt.load_state_dict(torch.load(opt_file, weights_only=True))
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(local(p), local(q)), f"{name} reloaded differs"
    for m, o in ((model, opt), (fresh, fresh_opt)):  # one more step each: the optimizer states agree too
        full(m(ids)).pow(2).mean().backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(local(p), local(q)), f"{name} after a step from the reloaded optimizer"
    params = torch.load(_saved(list(model.parameters())), weights_only=False)  # the parameters themselves pickle
    assert all(torch.equal(local(p), local(q)) for p, q in zip(params, model.parameters()))
    twin = copy.deepcopy(model)
    assert torch.equal(full(twin(ids)), full(model(ids)))
    return True


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
@pytest.mark.parametrize("styles", ["dtp", "torch"])
def test_torch_save_of_state_dicts_reloads_exactly(pools, styles, sp):
    """dtp's plans pickle as torch TP's do: per-rank torch.save files reload with weights_only=True, bit for bit."""
    assert pools.run(2, case_state_dicts_pickle, styles, sp) == [True, True]


# -- double backward: a gradient penalty against one process --------------------------------------------------------

class TinyLM(nn.Module):
    def __init__(self, vocab=12, dim=8, hidden=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.tanh(self.up(self.norm(h))))
        return self.head(self.head_norm(h))


def _tiny_plan(sp):
    residual = Shard(1) if sp else Replicate()
    plan = {"embed": dtp.RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
            "up": dtp.ColwiseParallel(input_layouts=residual), "down": dtp.RowwiseParallel(output_layouts=residual),
            "head": dtp.ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)}
    if sp:
        plan.update({"norm": dtp.SequenceParallel(use_local_output=True),
                     "head_norm": dtp.SequenceParallel(use_local_output=True)})
    return plan


def _penalized_backward(model, ids, targets, loss_fn):
    """loss + Σ ||∂loss/∂p||², backward through the gradients (create_graph); returns (value, {name: grad})."""
    params = dict(model.named_parameters())
    loss = loss_fn(model(ids), targets)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    total = loss + sum(full(g).pow(2).sum() for g in grads)
    total.backward()
    return full(total).detach(), {n: full(p.grad) for n, p in params.items()}


def case_gradient_penalty(sp):
    torch.manual_seed(0)
    single = TinyLM().double()
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), _tiny_plan(sp))
    ids = torch.randint(0, 12, (2, 4), generator=torch.Generator().manual_seed(2))
    targets = ids.roll(-1, 1)
    ref_total, ref_grads = _penalized_backward(single, ids, targets, lambda y, t: nn.functional.cross_entropy(
        y.flatten(0, 1), t.flatten()))
    total, grads = _penalized_backward(model, ids, targets, lambda y, t: dtp.vocab_parallel_cross_entropy(y, t))
    close64(total, ref_total, "penalized loss")
    for name, ref in ref_grads.items():
        close64(grads[name], ref, f"gradient of {name} through the gradient penalty")
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_gradient_penalty_matches_one_process(pools, world, sp):
    """create_graph through the vocab-parallel embedding, SP norms, prepared inputs, column and row layers and the
    parallel loss gives one process's second derivatives."""
    assert pools.run(world, case_gradient_penalty, sp) == [True] * world


def case_penalty_as_torch_tp():
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    models = {"single": single}
    for name, lib in (("dtp", dtp), ("torch", torch_tp)):
        models[name] = lib.parallelize_module(copy.deepcopy(single), dtp.default_mesh(),
                                              {"0": lib.ColwiseParallel(), "2": lib.RowwiseParallel()})
    x = torch.randn(3, 4, dtype=torch.float64)
    results = {name: _penalized_backward(m, x, None, lambda y, t: y.pow(2).sum()) for name, m in models.items()}
    agree = {}
    for name in ("dtp", "torch"):
        try:
            close64(results[name][0], results["single"][0], f"{name}: penalized loss")
            for p, ref in results["single"][1].items():
                got = results[name][1][p]
                assert got is not None, f"{name}: no gradient for {p} through the penalty"
                close64(got, ref, f"{name}: gradient of {p} through the penalty")
            agree[name] = True
        except AssertionError as e:
            agree[name] = str(e)[:300]
    return agree


def test_gradient_penalty_agrees_with_torch_tp(pools):
    """dtp's second derivatives equal one process's on every torch; torch's TP agrees from torch 2.13 (on 2.7 it
    drops the second-order terms of some parameters: their gradients stay None)."""
    agree = pools.run(2, case_penalty_as_torch_tp)[0]
    assert agree["dtp"] is True, agree["dtp"]
    if TORCH_VERSION >= (2, 13):
        assert agree["torch"] is True, agree["torch"]


def _shard_of(full_param, placement, axis):
    """This rank's shard of a full (replicated) tensor; its gradient is gathered, so a perturbation of any element
    of the full tensor, made on every rank, is seen by gradcheck as one input."""
    if isinstance(placement, Shard):
        local = split_to(full_param, placement.dim, chunk_sizes(full_param.shape[placement.dim], axis.size), axis)
    else:
        local = full_param
    return from_local(local, axis.mesh, placement, full_param.shape)


def case_gradgradcheck(kind):
    import parallel_linear

    torch.manual_seed(0)
    axis = axis_of(dtp.default_mesh())
    world = axis.size
    if kind == "shim":
        column, row = parallel_linear.ColumnParallelLinear(3, 2 * world), parallel_linear.RowParallelLinear(2 * world, 3)
        w1, b1 = torch.randn(2 * world, 3), torch.randn(2 * world)
        w2, b2 = torch.randn(3, 2 * world), torch.randn(3)

        def fn(x, w1, b1, w2, b2):  # Column (gathered) -> tanh -> this rank's slice -> Row; full tensors in
            local = lambda t, d: split_to(t, d, chunk_sizes(t.shape[d], world), axis)
            h = functional_call(column, {"weight": local(w1, 0), "bias": local(b1, 0)}, (x,))
            h = local(torch.tanh(h), -1)
            return functional_call(row, {"weight": local(w2, 1), "bias": b2}, (h,))
    else:
        single = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        model = dtp.parallelize_module(single, dtp.default_mesh(), {"0": dtp.ColwiseParallel(),
                                                                   "2": dtp.RowwiseParallel()})
        names = [n for n, _ in model.named_parameters()]
        placements = [p.placements[0] for p in model.parameters()]
        w1, b1, w2, b2 = (torch.randn(p.shape) for p in model.parameters())

        def fn(x, *fulls):
            params = {n: _shard_of(f, pl, axis) for n, f, pl in zip(names, fulls, placements)}
            return functional_call(model, params, (x,))
    x = torch.randn(2, 3)
    inputs = tuple(t.double().requires_grad_() for t in (x, w1, b1, w2, b2))
    if kind == "shim":
        column.double(), row.double()
    else:
        model.double()
    torch.manual_seed(1)  # gradgradcheck's random output gradients (and fast mode's vectors): the same on every rank
    # At 4 ranks the fast mode: the same Jacobians checked through random projections u^T J v, which any wrong
    # entry changes (the full check there is 65 perturbed inputs x 4 ranks: 12 s of the suite for no other path).
    fast = world > 2
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("kind", ["shim", "styles"])
def test_gradgradcheck_float64(pools, world, kind):
    """gradgradcheck in float64 through the parallel_linear classes and the Colwise/Rowwise styles."""
    assert pools.run(world, case_gradgradcheck, kind) == [True] * world


# -- .grad by AccumulateGrad's rules --------------------------------------------------------------------------------

def case_grad_buffers():
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    model = copy.deepcopy(single)
    # a prepared replicated input: the column layer's dW is deferred onto the dX all-reduce
    dtp.parallelize_module(model, dtp.default_mesh(), {
        "": dtp.PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
        "0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()})
    x = torch.randn(3, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    model(x).pow(2).sum().backward()
    single(x_ref).pow(2).sum().backward()
    held = {n: p.grad for n, p in model.named_parameters()}
    locals_ = {n: p.grad.to_local() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad.zero_()
    for p in single.parameters():
        p.grad.zero_()
    for _ in range(2):  # accumulated twice into the zeroed buffers
        model(x).pow(2).sum().backward()
        single(x_ref).pow(2).sum().backward()
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        assert p.grad is held[name], f"{name}: .grad was replaced, not accumulated in place"
        assert p.grad.to_local().data_ptr() == locals_[name].data_ptr(), f"{name}: a new local buffer"
        assert_close(held[name].full_tensor(), ref.grad, f"{name}: the held gradient sees the accumulation")
    return True


def test_grad_buffers_accumulate_in_place(pools):
    assert pools.run(2, case_grad_buffers) == [True, True]


def case_grad_dtype():
    if not hasattr(torch.Tensor, "grad_dtype"):
        return "no grad_dtype"
    torch.manual_seed(0)
    model = dtp.parallelize_module(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 4)).bfloat16(), dtp.default_mesh(),
                                   {"0": dtp.ColwiseParallel(), "1": dtp.RowwiseParallel()})
    for p in model.parameters():
        p.grad_dtype = torch.float32
    model(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, f"{name}: gradient {p.grad.dtype}, grad_dtype float32"
    return True


def test_grad_dtype_is_honoured(pools):
    results = pools.run(2, case_grad_dtype)
    assert results in ([True, True], ["no grad_dtype"] * 2)
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip(f"torch {torch.__version__} has no Tensor.grad_dtype")


def case_no_warning():
    model, opt, ids = None, None, None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for sp in (False, True):
            model, opt, ids = _trained_gpt("dtp", sp, steps=2)
        mesh = dtp.default_mesh()
        import parallel_linear
        shim = parallel_linear.ColumnParallelLinear(4, 2 * mesh.size())
        shim(torch.randn(2, 4)).sum().backward()
    return [f"{w.filename}:{w.lineno}: {w.message}" for w in seen]


def test_plain_training_step_warns_nothing(pools):
    for messages in pools.run(2, case_no_warning):
        ours = [m for m in messages if "/dtp/" in m or "parallel_linear" in m]
        assert not ours, ours


class _Shared(nn.Module):
    """Two parameters whose gradients autograd hands over as one tensor (AddBackward passes dY to both): a view of a
    reduction where w + b is broadcast over the batch, the very same fresh tensor where it is not."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(shape))
        self.b = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return x * 2 + (self.w + self.b)


def case_shared_gradients_stay_apart(shape):
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(4, 4), _Shared(shape))
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), {"0": dtp.ColwiseParallel(
        output_layouts=Replicate())})  # _Shared is left to the plan's default: replicated, run on local tensors
    x = torch.randn(3, 4)
    for _ in range(3):  # the later backwards accumulate into .grad in place: w's and b's buffers must be apart
        model(x).pow(2).sum().backward()
        single(x).pow(2).sum().backward()
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        assert_close(full(p.grad), ref.grad, f"accumulated gradient of {name}")
    w, b = model[1].w.grad.to_local(), model[1].b.grad.to_local()
    assert w.data_ptr() != b.data_ptr(), "two parameters share one gradient buffer"
    return True


def test_shared_gradients_stay_apart(pools):
    """A gradient autograd gives to two parameters (or that a hook holds) is copied before it is stored and later
    accumulated in place, as AccumulateGrad does."""
    for shape in ((4,), (3, 4)):  # broadcast over the batch (dY summed: a view), and not (dY itself)
        assert pools.run(2, case_shared_gradients_stay_apart, shape) == [True, True], shape
