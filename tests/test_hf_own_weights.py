"""Hugging Face plan strings on modules that compute with their own split weights (no nn.Linear children): Inkling's
shared experts under `all_reduce` with stacked weights split by parameter entries, and a fused gate_up parameter
that a plain `colwise` entry would split wrongly (a PlanMistake at plan time)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import dtp
from dtp.plan.mistakes import PlanMistake

from .reference import compare_forward_backward


class SharedExperts(nn.Module):
    """Inkling's shared experts: stacked [n, inter, d] weights through torch.bmm, scaled by per-token gammas."""

    def __init__(self, n=2, d=8, inter=12):
        super().__init__()
        self.n = n
        self.gate_proj = nn.Parameter(torch.randn(n, inter, d) * 0.3)
        self.up_proj = nn.Parameter(torch.randn(n, inter, d) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(n, d, inter) * 0.3)

    def forward(self, x, gammas):
        shape = x.shape
        h = x.reshape(1, -1, shape[-1]).expand(self.n, -1, -1)
        g = gammas.reshape(-1, self.n, 1).transpose(0, 1)
        a = F.silu(torch.bmm(h, self.gate_proj.transpose(1, 2))) * torch.bmm(h, self.up_proj.transpose(1, 2)) * g
        return torch.bmm(a, self.down_proj.transpose(1, 2)).sum(0).view(shape)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(8, 2)
        self.shared = SharedExperts()

    def forward(self, x):
        return x + self.shared(x, gammas=torch.sigmoid(self.router(x)))


SHARED_PLAN = {"shared.gate_proj": "colwise", "shared.up_proj": "colwise", "shared.down_proj": "rowwise",
               "shared": "all_reduce"}


def case_shared_experts_all_reduce():
    """Output, input gradient, the router's gradient (through the gammas keyword) and every split weight's gradient
    equal one process: the gammas' and the tokens' gradients are summed over the ranks."""
    torch.manual_seed(0)
    single = Block()
    ours = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), SHARED_PLAN)
    assert ours.shared.gate_proj.placements[0].dim == 1 and ours.shared.down_proj.placements[0].dim == 2
    compare_forward_backward(ours, single, torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("world", [2, 4])
def test_shared_experts_with_their_own_split_weights_equal_one_process(pools, world):
    pools.run(world, case_shared_experts_all_reduce)


class HalvesExperts(nn.Module):
    """[gate; up] stacked in one parameter and taken apart as two halves (Inkling)."""

    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 16, 8) * 0.3)

    def forward(self, x):
        return self.act(torch.einsum("td,eod->teo", x, self.gate_up_proj)).sum(1)

    def act(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class InterleavedExperts(HalvesExperts):
    """The same, stored as interleaved (gate, up) pairs (gpt-oss): a contiguous split keeps each pair together."""

    def act(self, gate_up):
        return F.silu(gate_up[..., ::2]) * gate_up[..., 1::2]


def case_fused_gate_up(interleaved: bool):
    """A plain colwise entry on a fused gate_up taken as halves is named at plan time, on every rank; interleaved
    pairs split contiguously are right and pass; packed_colwise on the halves passes."""
    model = nn.Sequential(InterleavedExperts() if interleaved else HalvesExperts())
    if not interleaved:
        with pytest.raises(PlanMistake, match=r"0\.gate_up_proj.*fused \[gate; up\].*HalvesExperts.*packed_colwise"):
            dtp.parallelize_module(copy.deepcopy(model), dtp.default_mesh(), {"0.gate_up_proj": "colwise"})
    fixed = dtp.parallelize_module(copy.deepcopy(model), dtp.default_mesh(),
                                   {"0.gate_up_proj": "colwise" if interleaved else "packed_colwise"})
    return isinstance(fixed[0].gate_up_proj, DTensor)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_colwise_on_a_fused_gate_up_taken_as_halves_is_named(pools, interleaved):
    assert pools.run(2, case_fused_gate_up, interleaved) == [True, True]
