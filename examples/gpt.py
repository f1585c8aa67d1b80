"""A small GPT-style decoder written as plain nn.Modules, and the plan that makes it tensor parallel.

The model knows nothing about parallelism; `tp_plan` is data, written the way torch's own
parallelize_module plans are (torchtitan style), so it runs unchanged on either library.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import dtp
from dtp import Replicate, Shard


@dataclass
class GPTConfig:
    vocab_size: int = 96
    dim: int = 32
    n_heads: int = 4
    n_layers: int = 2
    hidden: int = 64
    norm: str = "layer"  # "layer" (nn.LayerNorm) or "rms" (the RMSNorm below)
    bias: bool = True


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)

    def forward(self, x):
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them
        q, k, v = (w(x).unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.dim, cfg.hidden, bias=cfg.bias)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=cfg.bias)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        norm = (lambda: nn.LayerNorm(cfg.dim)) if cfg.norm == "layer" else (lambda: RMSNorm(cfg.dim))
        self.attention_norm, self.attention = norm(), Attention(cfg)
        self.ffn_norm, self.mlp = norm(), MLP(cfg)

    def forward(self, x):
        h = x + self.attention(self.attention_norm(x))
        return h + self.mlp(self.ffn_norm(h))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim) if cfg.norm == "layer" else RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def tp_plan(sequence_parallel: bool = False, styles=dtp) -> dict:
    """Heads split over ranks (wq/wk/wv column-wise, wo row-wise), MLP likewise, vocab-parallel embedding and
    lm-head (logits stay sharded over the vocab for the parallel loss).  With sequence_parallel the norms run
    on sequence shards and the residual stream stays a DTensor sharded on the sequence (uneven lengths work).

    `styles` is where the style classes come from: dtp, or torch.distributed.tensor.parallel; the plan
    is the same text either way.
    """
    ColwiseParallel, RowwiseParallel = styles.ColwiseParallel, styles.RowwiseParallel
    PrepareModuleInput, SequenceParallel = styles.PrepareModuleInput, styles.SequenceParallel
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()
    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual, use_local_output=not sp),
        "layers.*.attention": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
        "layers.*.attention.w[qkv]": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(output_layouts=residual, use_local_output=not sp),
        "layers.*.mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
        "layers.*.mlp.up": ColwiseParallel(),
        "layers.*.mlp.down": RowwiseParallel(output_layouts=residual, use_local_output=not sp),
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False),
    }
    if sp:
        plan.update({"layers.*.attention_norm": SequenceParallel(), "layers.*.ffn_norm": SequenceParallel(),
                     "norm": SequenceParallel()})
    return plan
