"""Modules a plan does not split keep working whatever they compute with (item 2 of #17), and a model's own plan
mistakes are named by module, never a shape error mid-forward or a silent gradient difference (item 3)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import dtp
from dtp.plan.mistakes import PlanMistake
from tests.reference import assert_close


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


class ConvMixer(nn.Module):
    """As Qwen3.5's linear attention: F.conv1d on a child's weight, an in-place buffer and a recurrent state."""

    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, groups=dim, padding=2)
        self.decay = nn.Parameter(torch.full((dim,), 0.5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):  # x: [batch, seq, dim]
        self.calls += 1
        y = F.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, padding=2, groups=x.shape[-1])
        y = y[..., : x.shape[1]].transpose(1, 2)
        state, out = torch.zeros_like(y[:, 0]), []
        for t in range(y.shape[1]):  # a recurrence over the sequence
            state = state * torch.sigmoid(self.decay) + y[:, t]
            out.append(state)
        return torch.stack(out, 1)


class Hybrid(nn.Module):
    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.in_proj = nn.Linear(dim, dim)
        self.mixer = ConvMixer(dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.mixer(self.in_proj(x))
        return self.down(F.gelu(self.up(self.norm(h + x))))


PLAN = {"in_proj": "colwise_gather_output", "up": "colwise", "down": "rowwise"}


def case_unsplit_modules_keep_working(replicate_rest):
    torch.manual_seed(0)
    single = Hybrid()
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), PLAN, replicate_rest=replicate_rest)
    assert isinstance(model.mixer.conv.weight, DTensor) == replicate_rest, "every parameter a DTensor by default"
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, single)]
    for step in range(2):
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        out, ref = model(xs[0]), single(xs[1])
        assert_close(out, ref, f"step {step} output")
        out.square().sum().backward()
        ref.square().sum().backward()
        assert_close(xs[0].grad, xs[1].grad, f"step {step} input grad")
        for (name, p), r in zip(model.named_parameters(), single.parameters()):
            assert_close(full(p.grad), r.grad, f"step {step} grad of {name}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
    assert int(model.mixer.calls) == int(single.mixer.calls) == 2, "the in-place buffer update happened"


@pytest.mark.parametrize("replicate_rest", [True, False])
def test_unsplit_modules_keep_working(pools, replicate_rest):
    """A module that reads its child's weight with F.conv1d, updates a buffer in place and runs a recurrence, between
    split layers: outputs, input and parameter gradients and 2 AdamW steps equal one process."""
    pools.run(2, case_unsplit_modules_keep_working, replicate_rest)


class ScaledAct(nn.Module):
    """A trainable activation (Apertus' xIELU): a whole parameter applied elementwise."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return F.silu(x) * self.alpha


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 16), ScaledAct(), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.act(self.up(x).view(2, 3, -1))).flatten(0, 1)


def case_uncovered_parameter_on_sharded_activations():
    torch.manual_seed(0)
    single = Mlp()
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), {"up": "colwise", "down": "rowwise"})
    x = torch.randn(6, 8)
    with torch.no_grad():  # no gradient, no mistake: the values are right
        assert_close(model(x), single(x), "inference output")
    with pytest.raises(PlanMistake, match=r"module 'act' \(ScaledAct\) .*alpha.*column-parallel.*replicated_with_grad"):
        model(x)
    fixed = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(),
                                   {"up": "colwise", "down": "rowwise", "act": "replicated_with_grad_allreduce"})
    fixed(x).sum().backward()
    single(x).sum().backward()
    assert_close(full(fixed.act.alpha.grad), single.act.alpha.grad, "alpha's gradient with the entry")
    return True


def test_uncovered_parameter_on_sharded_activations_is_named(pools):
    """A trainable parameter no entry covers, read on a column layer's local output: a PlanMistake naming the module
    and the fix at the first grad-mode forward, on every rank (never a silent 1/tp gradient); with the fix, exact."""
    assert pools.run(2, case_uncovered_parameter_on_sharded_activations) == [True, True]


class HeadGate(nn.Module):
    """As Doge's attention: dt_proj gives one value per head, which the (split) heads then read."""

    def __init__(self, heads=4, head_dim=2):
        super().__init__()
        self.num_attention_heads, self.head_dim = heads, head_dim
        self.v_proj = nn.Linear(8, heads * head_dim)
        self.dt_proj = nn.Linear(heads * head_dim, heads)
        self.o_proj = nn.Linear(heads * head_dim, 8)

    def forward(self, x):
        v = self.v_proj(x)
        gate = self.dt_proj(v).sigmoid()
        return self.o_proj((v.unflatten(-1, (-1, self.head_dim)) * gate[..., None]).flatten(-2))


def case_rowwise_head_values():
    model = HeadGate()
    with pytest.raises(PlanMistake, match=r"'dt_proj'.*one per head \(num_attention_heads=4 of ''\).*Shard\(-1\)"):
        dtp.parallelize_module(model, dtp.default_mesh(), {"v_proj": "colwise", "dt_proj": "rowwise", "o_proj": "rowwise"})
    assert not isinstance(model.v_proj.weight, DTensor), "nothing changed"
    single = HeadGate()
    fixed = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), {
        "v_proj": dtp.ColwiseParallel(), "dt_proj": dtp.RowwiseParallel(output_layouts=dtp.Shard(-1)),
        "o_proj": dtp.RowwiseParallel()})
    x = torch.randn(3, 8)
    assert_close(fixed(x), single(x), "output with dt_proj's output split by heads")
    return True


def test_rowwise_entry_with_one_output_per_head_is_named_at_plan_time(pools):
    """Doge's `dt_proj: rowwise` would give each rank all heads' gates: a PlanMistake at plan time, on every rank,
    before anything changes; the suggested fix (reduce-scatter onto the heads) equals one process."""
    assert pools.run(2, case_rowwise_head_values) == [True, True]
