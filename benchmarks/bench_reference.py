"""The benchmark's yardstick: hand-written Megatron-style tensor parallelism (plain local parameters,
autograd functions with explicit torch.distributed collectives), nothing dtp-specific in it."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["HandMLP", "HandBlock", "HandLlama"]


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


class _GatherFromTP(torch.autograd.Function):
    """forward all-gather of the last dim, backward keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return g.chunk(world, dim=-1)[rank], None


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


class HandLlama(nn.Module):
    """examples.llama.Llama (no sequence parallel) split Megatron-style: vocab-parallel embedding, heads and SwiGLU
    hidden over ranks, column-parallel lm-head gathered; even sizes only."""

    def __init__(self, model: nn.Module, group=None):
        super().__init__()
        from examples.llama import apply_rotary_emb, repeat_kv

        self._rope, self._repeat = apply_rotary_emb, repeat_kv
        self.group = group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        vocab = model.tok_embeddings.weight.shape[0]
        self.rows, self.start = vocab // world, rank * (vocab // world)
        self.emb = _slice(model.tok_embeddings.weight, 0, rank, world)
        self.blocks = []
        for i, block in enumerate(model.layers.values()):
            att, ffn = block.attention, block.feed_forward
            for name, lin, dim in (("wq", att.wq, 0), ("wk", att.wk, 0), ("wv", att.wv, 0), ("wo", att.wo, 1),
                                   ("w1", ffn.w1, 0), ("w3", ffn.w3, 0), ("w2", ffn.w2, 1)):
                setattr(self, f"{name}_{i}", _slice(lin.weight, dim, rank, world))
            self.add_module(f"attention_norm_{i}", block.attention_norm)
            self.add_module(f"ffn_norm_{i}", block.ffn_norm)
            self.blocks.append((i, att.head_dim, att.n_rep))
        self.norm, self.out = model.norm, _slice(model.output.weight, 0, rank, world)
        self.register_buffer("freqs_cis", model.freqs_cis, persistent=False)

    def forward(self, ids):
        b, s = ids.shape
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        h = F.embedding(local.masked_fill(outside, 0), self.emb).masked_fill(outside.unsqueeze(-1), 0)
        h = _ReduceFromTP.apply(h, self.group)
        for i, head_dim, n_rep in self.blocks:
            w = lambda name: getattr(self, f"{name}_{i}")  # noqa: E731
            x = _CopyToTP.apply(getattr(self, f"attention_norm_{i}")(h), self.group)
            q, k, v = (F.linear(x, w(n)).view(b, s, -1, head_dim) for n in ("wq", "wk", "wv"))
            q, k = self._rope(q, k, self.freqs_cis[:s])
            k, v = self._repeat(k, n_rep), self._repeat(v, n_rep)
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            h = h + _ReduceFromTP.apply(F.linear(y.transpose(1, 2).reshape(b, s, -1), w("wo")), self.group)
            x = _CopyToTP.apply(getattr(self, f"ffn_norm_{i}")(h), self.group)
            h = h + _ReduceFromTP.apply(F.linear(F.silu(F.linear(x, w("w1"))) * F.linear(x, w("w3")), w("w2")), self.group)
        x = _CopyToTP.apply(self.norm(h), self.group)
        return _GatherFromTP.apply(F.linear(x, self.out), self.group)
