"""A small torchtitan-style mixture-of-experts language model for the expert-parallel tests: top-k softmax router,
stacked SwiGLU experts (w1 / w2 / w3 on a leading expert dim, called as transformers' experts are), a shared expert,
a sequence-wise auxiliary load-balancing loss, and a plain multi-head attention (so plans can also split it over tp)."""

import torch
import torch.nn.functional as F
from torch import nn


class GroupedExperts(nn.Module):
    """experts(x (N, d), top_k_index (N, k), top_k_weights (N, k)) = Σ_j w_tj · SwiGLU_{i_tj}(x_t); every expert runs
    (on no rows if none chose it), so each gets a gradient."""

    def __init__(self, dim, hidden, num_experts):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim ** 0.5)
        self.w2 = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden ** 0.5)
        self.w3 = nn.Parameter(torch.randn(num_experts, hidden, dim) / dim ** 0.5)

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows, slots = torch.where(top_k_index == e)
            h = x[rows]
            y = F.linear(F.silu(F.linear(h, self.w1[e])) * F.linear(h, self.w3[e]), self.w2[e])
            out = out.index_add(0, rows, y * top_k_weights[rows, slots, None])
        return out


class TopKRouter(nn.Module):
    def __init__(self, dim, num_experts, top_k):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x):
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        return probs, weights / weights.sum(-1, keepdim=True), index


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Routed experts + a shared expert; self.aux_loss: the sequence-wise balance loss E/k · Σ_e f_e · P_e, averaged
    over sequences (independent of how the batch is split over ranks)."""

    def __init__(self, dim, hidden, num_experts, top_k, route=None):
        super().__init__()
        self.router = TopKRouter(dim, num_experts, top_k)
        self.experts = GroupedExperts(dim, hidden, num_experts)
        self.shared_expert = FeedForward(dim, hidden)
        self.route = route  # a test hook: replaces the router's choice of experts (every token to one expert ...)
        self.aux_loss = None

    def forward(self, x):
        b, s, d = x.shape
        probs, weights, index = self.router(x.reshape(-1, d))
        if self.route is not None:
            index = self.route(index, self.router.num_experts)
            weights = torch.gather(probs, -1, index)
        counts = F.one_hot(index.view(b, s * index.shape[-1]), self.router.num_experts).sum(1).float()  # (b, E)
        frac = counts * self.router.num_experts / (s * index.shape[-1])
        self.aux_loss = (frac * probs.view(b, s, -1).mean(1)).sum(-1).mean()
        routed = self.experts(x.reshape(-1, d), index, weights.to(x.dtype))
        return routed.view(b, s, d) + self.shared_expert(x)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.n_heads, self.head_dim = heads, dim // heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, num_experts, top_k, route=None):
        super().__init__()
        self.attention_norm, self.moe_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.attention = Attention(dim, heads)
        self.moe = MoE(dim, hidden, num_experts, top_k, route)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.moe(self.moe_norm(x))


class MoEModel(nn.Module):
    def __init__(self, vocab=32, dim=16, heads=4, hidden=24, num_experts=4, top_k=2, layers=2, route=None):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden, num_experts, top_k, route) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))

    def aux_loss(self):
        return sum(layer.moe.aux_loss for layer in self.layers)


def loss_fn(model, logits, targets, alpha=0.01):
    """Cross entropy over the tokens + alpha · the layers' balance losses (means: a rank's micro-batch gives its share)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) + alpha * model.aux_loss()


def ep_plan(**kwargs):
    """Every MoE layer's experts split over the ep mesh."""
    import dtp
    return {"layers.*.moe.experts": dtp.ExpertParallel(**kwargs)}
