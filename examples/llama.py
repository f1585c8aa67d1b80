"""A small torchtitan-style Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU) as plain nn.Modules, and
torchtitan's `apply_tp` that makes it tensor parallel.

The model knows nothing about parallelism (modelled on torchtitan's models/llama3/model/model.py); `apply_tp`
follows models/llama3/infra/parallelize.py: one parallelize_module call on the root, then one per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard


@dataclass
class LlamaConfig:
    vocab_size: int = 96
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: each k/v head serves n_heads / n_kv_heads query heads
    multiple_of: int = 16
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 64


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back to x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """cis(t * theta^(-2i/dim)) for positions t < end and pairs i < dim/2: complex64, shape (end, dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq, xk, freqs_cis):
    """Rotate each (even, odd) feature pair of q, k (batch, seq, heads, head_dim), as a complex number, by
    freqs_cis[position]; freqs_cis: (>= seq, head_dim // 2)."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x, n_rep: int):
    """(batch, seq, kv_heads, head_dim) -> (batch, seq, kv_heads * n_rep, head_dim), each head n_rep times."""
    bs, seq, n_kv, hd = x.shape
    return x.unsqueeze(3).expand(bs, seq, n_kv, n_rep, hd).reshape(bs, seq, n_kv * n_rep, hd)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(head_dim) + causal mask) v over n_heads query heads sharing n_kv_heads k/v heads."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk, self.wv = (nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False) for _ in "kv")
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, freqs_cis):
        bs, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism a rank holds n_heads / tp and n_kv_heads / tp (same n_rep)
        xq, xk, xv = (w(x).view(bs, seqlen, -1, self.head_dim) for w in (self.wq, self.wk, self.wv))
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        keys, values = repeat_kv(xk, self.n_rep), repeat_kv(xv, self.n_rep)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden = 2/3 * 4 dim (times ffn_dim_multiplier), rounded up to multiple_of."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: float | None):
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = hidden_dim if ffn_dim_multiplier is None else int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h))."""

    def __init__(self, layer_id: int, cfg: LlamaConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm, self.attention = RMSNorm(cfg.dim, cfg.norm_eps), Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, 4 * cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, vocab_size); default nn init, norm weights ones."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.register_buffer("freqs_cis", precompute_freqs_cis(cfg.dim // cfg.n_heads, cfg.max_seq_len,
                                                               cfg.rope_theta), persistent=False)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers.values():
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))


def apply_tp(model: Llama, tp_mesh, *, loss_parallel: bool, enable_sp: bool, styles=None, parallelize_module=None):
    """torchtitan's apply_tp: heads split over ranks (wq/wk/wv column-wise, wo row-wise), SwiGLU likewise
    (w1/w3 column-wise, w2 row-wise), vocab-parallel embedding and column-parallel lm-head; with
    loss_parallel the logits stay a DTensor sharded over the vocab (Shard(-1)) for `loss_fn`.

    With enable_sp (torchtitan's only mode) the residual stream between blocks is sharded on the sequence
    (Shard(1), a plain local tensor), the norms run on sequence shards, and any seq works under dtp (torch needs seq divisible by tp).
    Deviations: torchtitan has no switch for SP; enable_sp=False turns every Shard(1) into Replicate() and
    drops the SequenceParallel entries (Megatron TP without SP). Its attention PrepareModuleInput has four
    entries (x, freqs_cis, attention_masks, positions); here two, (x, freqs_cis), freqs_cis a plain tensor.

    `styles` supplies the style classes (torch.distributed.tensor.parallel by default, or dtp);
    `parallelize_module` defaults to styles.parallelize_module.
    """
    if styles is None:
        import torch.distributed.tensor.parallel as styles
    parallelize_module = parallelize_module or styles.parallelize_module
    ColwiseParallel, RowwiseParallel = styles.ColwiseParallel, styles.RowwiseParallel
    PrepareModuleInput, SequenceParallel = styles.PrepareModuleInput, styles.SequenceParallel
    residual = Shard(1) if enable_sp else Replicate()

    # 1. embedding (its output is the first block's input), 2. the final norm, 3. the lm-head
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    if enable_sp:
        root_plan["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, root_plan)
    for block in model.layers.values():
        plan = {
            "attention": PrepareModuleInput(input_layouts=(residual, None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
            "feed_forward": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),
        }
        if enable_sp:
            plan.update({"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()})
        parallelize_module(block, tp_mesh, plan)
    return model


def loss_and_backward(logits, targets) -> torch.Tensor:
    """Mean cross entropy over all (batch, seq) positions, -mean(log softmax(logits)[target]), and its backward, as
    torchtitan's train step takes them: vocab-sharded DTensor logits under torch's loss_parallel() (forward and
    backward inside the context; the logits are never gathered), plain logits with F.cross_entropy."""
    from contextlib import nullcontext

    from torch.distributed.tensor.parallel import loss_parallel

    sharded = isinstance(logits, DTensor) and logits.placements[-1].is_shard(logits.ndim - 1)
    with loss_parallel() if sharded else nullcontext():
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
    return loss
