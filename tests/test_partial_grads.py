"""Column layers behind a replicated DTensor input hand back dX first and run dW / db while its all-reduce is in flight
(dtp.runtime.grads): the gradients are those of the single-process model whoever reduces dX, with accumulation,
a layer read twice, hooks, backward(inputs=) and torch.autograd.grad."""

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

import dtp
from .reference import assert_close


def _block_plan(styles):
    """A transformer block's plan: attention and MLP behind a replicated PrepareModuleInput, column then row layers."""
    replicated = styles.PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
    return {"attention": replicated, "attention.w[qkv]": styles.ColwiseParallel(),
            "attention.wo": styles.RowwiseParallel(), "mlp": copy.deepcopy(replicated),
            "mlp.up": styles.ColwiseParallel(), "mlp.down": styles.RowwiseParallel()}


class _Mixer(nn.Module):
    """q * k + v, then an output projection: three column readers of one input and a row layer."""

    def __init__(self, dim=8):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        return self.wo(self.wq(x) * self.wk(x) + self.wv(x))


class _ReadTwice(_Mixer):
    """wq reads the input twice: two deferred gradients of the same parameters in one backward."""

    def forward(self, x):
        return self.wo(self.wq(x) * self.wq(x) + self.wv(x))


def _mixer_pair(seed, mixer=_Mixer):
    torch.manual_seed(seed)
    single = nn.Sequential(nn.LayerNorm(8), mixer())
    plan = {"1": dtp.PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            "1.w[qkv]": dtp.ColwiseParallel(), "1.wo": dtp.RowwiseParallel()}
    return single, dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), plan)


def _assert_grads(model, single, what):
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        if ref.grad is None:  # a parameter the forward never read
            assert p.grad is None, f"{what}: {name}"
            continue
        assert type(p.grad) is DTensor and p.grad.placements == p.placements, f"{what}: {name}"
        assert_close(p.grad.full_tensor(), ref.grad, f"{what}: gradient of {name}")


def _zero(*models):
    for m in models:
        for p in m.parameters():
            p.grad = None


def _watch_reduction(model):
    """Records, at the start and at the end of each all-reduce of a partial dX, whether wq's weight (a column reader of
    it) and wo's (the row layer after it, computed earlier) have their gradients."""
    import dtp.runtime.conversions as conversions

    seen, original = [], conversions.all_reduce
    weights = (model[1].wq.weight, model[1].wo.weight)

    def watched(t, axis, *args, **kwargs):
        seen.append(("issued", [w.grad is not None for w in weights]))
        pending = original(t, axis, *args, **kwargs)

        class Recorded:
            def wait(self):
                seen.append(("waited", [w.grad is not None for w in weights]))
                return pending.wait()

        return Recorded()

    conversions.all_reduce = watched
    return seen, lambda: setattr(conversions, "all_reduce", original)


def case_block_gradients_and_overlap():
    from examples.gpt import Block, GPTConfig

    torch.manual_seed(0)
    single = Block(GPTConfig(dim=16, n_heads=4, hidden=32))
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), _block_plan(dtp))
    x = torch.randn(2, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    for step in range(2):  # the second backward adds to the stored gradients
        model(x).pow(2).sum().backward()
        single(x_ref).pow(2).sum().backward()
        _assert_grads(model, single, f"block, backward {step}")
        assert_close(x.grad, x_ref.grad, f"block input gradient, backward {step}")
    # the column layers' weight gradients are computed between the start and the end of dX's all-reduce
    _, mixer = _mixer_pair(1)
    seen, restore = _watch_reduction(mixer)
    try:
        mixer(torch.randn(3, 8)).sum().backward()
    finally:
        restore()
    assert seen == [("issued", [False, True]), ("waited", [True, True])], seen
    return True


def case_reuse_hooks_and_other_reducers():
    x = torch.randn(3, 8)
    single, model = _mixer_pair(2, _ReadTwice)  # both reads' deferred gradients are summed
    model(x).sum().backward()
    single(x).sum().backward()
    _assert_grads(model, single, "a layer read twice")
    single, model = _mixer_pair(2)
    # a post-accumulate hook on one weight: its layer hands over through autograd, the others still defer
    seen = []
    model[1].wk.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.full_tensor().clone()))
    model(x).sum().backward()
    single(x).sum().backward()
    _assert_grads(model, single, "with a hook")
    assert len(seen) == 1
    assert_close(seen[0], single[1].wk.weight.grad, "gradient seen by the hook")
    _zero(model, single)
    # backward(inputs=): only the parameters asked for get gradients; wq's weight and bias defer onto a dX that is
    # never reduced (the reduction is not needed for them): their work runs when the backward ends
    params, refs = list(model.parameters()), list(single.parameters())
    asked = (2, 3, 7)
    model(x).sum().backward(inputs=[params[i] for i in asked])
    single(x).sum().backward(inputs=[refs[i] for i in asked])
    assert [p.grad is not None for p in params] == [i in asked for i in range(len(params))]
    for i in asked:
        assert_close(params[i].grad.full_tensor(), refs[i].grad, f"backward(inputs=) parameter {i}")
    _zero(model, single)
    # torch.autograd.grad: captured, never stored
    grads = torch.autograd.grad(model(x).sum(), params)
    assert all(p.grad is None for p in params)
    for g, ref in zip(grads, torch.autograd.grad(single(x).sum(), refs)):
        assert_close(g.full_tensor(), ref, "torch.autograd.grad")
    # a node between the column layers and dtp's reduction (a hook added after the plan's) sees their gradients
    _zero(model, single)
    mixer_params, observed = [m.weight for m in (model[1].wq, model[1].wk, model[1].wv)], []
    handle = model[1].register_forward_pre_hook(lambda mod, args: (_SeeGrads.apply(args[0], mixer_params, observed),))
    model(x).sum().backward()
    handle.remove()
    single(x).sum().backward()
    assert observed == [[True, True, True]], observed
    _assert_grads(model, single, "with a node between the layers and the reduction")
    # a replicated input made by torch's own DTensor.from_local (not dtp's reduction: nothing deferred), then with a
    # hook that computes on the partial gradient
    mixer, ref = model[1], single[1]
    for hooked in (False, True):
        _zero(mixer, ref)
        xd = DTensor.from_local(x.clone().requires_grad_(), dtp.default_mesh(), [Replicate()], run_check=False)
        if hooked:
            xd.register_hook(lambda g: g * 1.0)
        mixer(xd).sum().backward()
        ref(x).sum().backward()
        _assert_grads(mixer, ref, f"torch's from_local{' and a gradient hook' if hooked else ''}")
    return True


class _SeeGrads(torch.autograd.Function):
    """Identity whose backward records which of `params` already have a gradient (as FSDP's post-backward reads them)."""

    @staticmethod
    def forward(ctx, x, params, seen):
        ctx.params, ctx.seen = params, seen
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.seen.append([p.grad is not None for p in ctx.params])
        return g, None, None


def case_fsdp_on_the_prepared_module():
    """TP then FSDP2 on the very module whose input is prepared, and on the root: gradients as one process."""
    import torch.distributed as dist

    torch.manual_seed(4)
    single = nn.Sequential(nn.LayerNorm(8), _Mixer())
    mesh = dtp.init_mesh(dp=2, tp=2)
    plan = {"1": dtp.PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)),
            "1.w[qkv]": dtp.ColwiseParallel(), "1.wo": dtp.RowwiseParallel()}
    model = dtp.parallelize_2d(copy.deepcopy(single), mesh, plan, fsdp_units=["1"])
    batch = torch.randn(4, 8)
    dp = mesh["dp"].get_local_rank()
    for step in range(2):
        model(batch[2 * dp: 2 * dp + 2]).pow(2).mean().backward()
        single(batch).pow(2).mean().backward()
        for (name, p), ref in zip(model.named_parameters(), single.parameters()):
            assert_close(p.grad.full_tensor(), ref.grad,
                         f"TP x FSDP gradient of {name}, backward {step}")
        _zero(model, single)
    dist.barrier()
    return True


def test_block_gradients_and_overlap(pools):
    assert pools.run(2, case_block_gradients_and_overlap) == [True, True]


def test_fsdp_on_the_prepared_module(pools):
    assert pools.run(4, case_fsdp_on_the_prepared_module) == [True] * 4


def test_reuse_hooks_and_other_reducers(pools):
    assert pools.run(2, case_reuse_hooks_and_other_reducers) == [True, True]
