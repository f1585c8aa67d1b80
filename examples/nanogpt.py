"""Models with packed projections, written as plain nn.Modules, and the plans that split them block by block.

`GPT`: nanoGPT / GPT-2 (fused `c_attn = nn.Linear(d, 3d)` with bias, tied embedding and lm-head, GELU MLP).
`GQAModel`: a Llama/Qwen2-style decoder with a fused GQA `qkv_proj` (q larger than k and v, with bias) and a fused
SwiGLU `gate_up_proj`.  Attention splits the packed output without knowing the tp size (`chunk(3, -1)`, or block
sizes in proportion, and `unflatten(-1, (-1, head_dim))`), so the same code runs on one process and on every rank:
under dtp's PackedColwiseParallel each rank's output slice is [q_r, k_r, v_r] (or [gate_r, up_r]).

    python examples/nanogpt.py [--world-size 2] [--model gqa]   # a few steps at tp=N and on one process; same losses
    torchrun --nproc_per_node 2 examples/nanogpt.py             # the same, ranks started by torchrun (rank 0 prints)
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

import dtp  # noqa: E402
from dtp import Replicate  # noqa: E402
from dtp.launch import add_launch_arguments, launch, rank_device, script_world_size  # noqa: E402


@dataclass
class GPTConfig:
    vocab_size: int = 96
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # [q, k, v] packed
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        head_dim = self.n_embd // self.n_head
        q, k, v = (t.unflatten(-1, (-1, head_dim)).transpose(1, 2) for t in self.c_attn(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).flatten(-2))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)), ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.transformer.wte(ids) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def gpt_plan() -> dict:
    """q, k and v heads split together (PackedColwiseParallel(blocks=3)), MLP and vocab as usual; logits gathered."""
    return {
        "transformer.wte": dtp.RowwiseParallel(input_layouts=Replicate()),
        "transformer.h.*.attn.c_attn": dtp.PackedColwiseParallel(blocks=3),
        "transformer.h.*.attn.c_proj": dtp.RowwiseParallel(),
        "transformer.h.*.mlp.c_fc": dtp.ColwiseParallel(),
        "transformer.h.*.mlp.c_proj": dtp.RowwiseParallel(),
        "lm_head": dtp.ColwiseParallel(output_layouts=Replicate()),
    }


@dataclass
class GQAConfig:
    vocab_size: int = 64
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 8
    n_kv_heads: int = 4
    hidden: int = 48


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GQAAttention(nn.Module):
    def __init__(self, cfg: GQAConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=True)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def block_sizes(self) -> tuple[int, int, int]:
        return self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim

    def forward(self, x):
        group = self.n_heads // self.n_kv_heads
        qkv = self.qkv_proj(x)
        kv = qkv.shape[-1] // (group + 2)  # q : k : v = group : 1 : 1 on one process and on every rank
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in qkv.split([group * kv, kv, kv], -1))
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).flatten(-2))


class GatedMLP(nn.Module):
    def __init__(self, cfg: GQAConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)  # [gate, up] packed
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class GQABlock(nn.Module):
    def __init__(self, cfg: GQAConfig):
        super().__init__()
        self.input_layernorm, self.self_attn = RMSNorm(cfg.dim), GQAAttention(cfg)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.dim), GatedMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class GQAModel(nn.Module):
    def __init__(self, cfg: GQAConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(GQABlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def gqa_plan(cfg: GQAConfig, hf_strings: bool = False) -> dict:
    """qkv_proj split by its unequal q / k / v blocks, gate_up_proj by its 2 blocks; with hf_strings the plan is
    written as a Hugging Face tp_plan ("packed_colwise" is 2 equal blocks, as in transformers: gate_up only)."""
    head_dim = cfg.dim // cfg.n_heads
    qkv = (cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim, cfg.n_kv_heads * head_dim)
    plan = {
        "embed_tokens": dtp.RowwiseParallel(input_layouts=Replicate()),
        "layers.*.self_attn.qkv_proj": dtp.PackedColwiseParallel(blocks=qkv),
        "layers.*.self_attn.o_proj": dtp.RowwiseParallel(),
        "layers.*.mlp.gate_up_proj": "packed_colwise" if hf_strings else dtp.PackedColwiseParallel(blocks=2),
        "layers.*.mlp.down_proj": "rowwise" if hf_strings else dtp.RowwiseParallel(),
        "lm_head": dtp.ColwiseParallel(output_layouts=Replicate()),
    }
    return plan


def train(steps: int = 3, which: str = "gpt") -> list[float]:
    """A few AdamW steps at tp = the world size and on one process (same seed, same batch): both losses per step."""
    torch.manual_seed(0)
    single = (GPT(GPTConfig()) if which == "gpt" else GQAModel(GQAConfig())).to(rank_device())
    model = copy.deepcopy(single)
    plan = gpt_plan() if which == "gpt" else gqa_plan(single.cfg)
    dtp.parallelize_module(model, dtp.default_mesh(), plan)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, single)]
    ids = torch.randint(0, single.cfg.vocab_size, (4, 16)).to(rank_device())
    losses = []
    for _ in range(steps):
        pair = []
        for m, opt in zip((model, single), optimizers):
            loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            pair.append(loss.item())
        losses.append(pair)
    return losses


def job(steps: int, which: str) -> tuple:
    """One rank's part: the losses, with the world size and backend for the printout."""
    return train(steps, which), dist.get_world_size(), dist.get_backend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_launch_arguments(parser)
    parser.add_argument("--model", choices=["gpt", "gqa"], default="gpt")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    # python: starts the ranks here; torchrun: this process is one rank (bounded collectives, exit on failure)
    result = launch(job, args.steps, args.model, world_size=script_world_size(args.world_size), backend=args.backend)
    if result is None:  # a torchrun rank other than 0: rank 0 prints
        return
    losses, world, backend = result
    for step, (tp_loss, one_loss) in enumerate(losses):
        print(f"step {step}: tp={world} loss {tp_loss:.6f}   one process {one_loss:.6f}   "
              f"|diff| {abs(tp_loss - one_loss):.1e}")
    worst = max(abs(a - b) for a, b in losses)
    print(f"{args.model}: max |tp - one process| over {len(losses)} steps on {world} ranks ({backend}): {worst:.2e}")


if __name__ == "__main__":
    main()
