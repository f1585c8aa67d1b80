"""The benchmark's yardstick: hand-written Megatron-style tensor parallelism (plain local parameters,
autograd functions with explicit torch.distributed collectives), nothing dtp-specific in it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["HandMLP", "HandBlock"]


class _CopyToTP(torch.autograd.Function):
    """f: forward identity, backward all-reduce."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    """g: forward all-reduce, backward identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


def _slice(t: torch.Tensor, dim: int, rank: int, world: int) -> nn.Parameter:
    return nn.Parameter(t.detach().chunk(world, dim)[rank].clone())


class HandMLP(nn.Module):
    """Linear -> GELU -> Linear split Megatron-style from a single-process nn.Sequential of the same shape."""

    def __init__(self, mlp: nn.Sequential, group=None):
        super().__init__()
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.w1, self.b1 = _slice(mlp[0].weight, 0, rank, world), _slice(mlp[0].bias, 0, rank, world)
        self.w2, self.b2 = _slice(mlp[2].weight, 1, rank, world), nn.Parameter(mlp[2].bias.detach().clone())

    def forward(self, x):
        h = F.gelu(F.linear(_CopyToTP.apply(x, self.group), self.w1, self.b1))
        return _ReduceFromTP.apply(F.linear(h, self.w2), self.group) + self.b2


class HandBlock(nn.Module):
    """A pre-norm transformer block (examples.gpt.Block) split Megatron-style: heads and MLP hidden over ranks."""

    def __init__(self, block: nn.Module, group=None):
        super().__init__()
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        att, mlp = block.attention, block.mlp
        self.head_dim = att.head_dim
        self.norm1, self.norm2 = block.attention_norm, block.ffn_norm
        for name in ("wq", "wk", "wv"):
            lin = getattr(att, name)
            setattr(self, name, _slice(lin.weight, 0, rank, world))
            setattr(self, name + "_b", _slice(lin.bias, 0, rank, world))
        self.wo, self.wo_b = _slice(att.wo.weight, 1, rank, world), nn.Parameter(att.wo.bias.detach().clone())
        self.up, self.up_b = _slice(mlp.up.weight, 0, rank, world), _slice(mlp.up.bias, 0, rank, world)
        self.down, self.down_b = _slice(mlp.down.weight, 1, rank, world), nn.Parameter(mlp.down.bias.detach().clone())

    def forward(self, x):
        b, s, _ = x.shape
        h = _CopyToTP.apply(self.norm1(x), self.group)
        q, k, v = (F.linear(h, w, bias).view(b, s, -1, self.head_dim).transpose(1, 2)
                   for w, bias in ((self.wq, self.wq_b), (self.wk, self.wk_b), (self.wv, self.wv_b)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        x = x + _ReduceFromTP.apply(F.linear(y, self.wo), self.group) + self.wo_b
        h = _CopyToTP.apply(self.norm2(x), self.group)
        h = F.gelu(F.linear(h, self.up, self.up_b))
        return x + _ReduceFromTP.apply(F.linear(h, self.down), self.group) + self.down_b
