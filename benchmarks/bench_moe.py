"""MoE benchmark: a mixture-of-experts layer and a small MoE model at ep = the world, in one run, interleaved.

    python -m benchmarks.bench_moe --shapes layer model --world-size 2 --rounds 20 --steps 3 [--json out.json]

Variants (forward + backward of one training step, no optimizer): "dtp" (dtp.ExpertParallel, each rank its own
tokens; the dense parameters left plain, replicate_rest=False, as a data-parallel wrapper would take them), "hand" (a hand-written expert-parallel layer: plain local expert weights, torch's functional
all_to_all_single_autograd, as torchtitan writes it) and "single" (one process on the global batch, rank 0 alone).
Also reported: the share of dtp's step spent in its all-to-alls (each call timed, in a separate pass) and the
(token, expert) pairs each rank's experts received per step (the load imbalance: max / mean).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dtp.testing import RankPool
from benchmarks.interleave import round_order

SHAPES = {  # model kwargs, tokens per rank (batch, seq)
    "layer": (dict(dim=128, hidden=256, num_experts=8, top_k=2), (4, 64)),
    "model": (dict(vocab=256, dim=128, heads=4, hidden=256, num_experts=8, top_k=2, layers=2), (4, 64)),
    "layer-skewed": (dict(dim=128, hidden=256, num_experts=8, top_k=2), (4, 64)),  # every pair to rank 0's experts
}


class HandExperts(nn.Module):
    """The hand-written expert-parallel layer: this rank's experts' weights as plain parameters; counts exchanged with
    dist.all_to_all_single, tokens and outputs with torch's differentiable functional all-to-all."""

    def __init__(self, experts, group):
        super().__init__()
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.ep, self.num_local = group, ep, experts.num_experts // ep
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name).detach()
            setattr(self, name, nn.Parameter(full[rank * self.num_local:(rank + 1) * self.num_local].clone()))

    def forward(self, x, index, weights):
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        k = index.shape[-1]
        ids = index.reshape(-1)
        order = torch.argsort(ids, stable=True)
        send_counts = torch.bincount(ids, minlength=self.ep * self.num_local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.view(self.ep, -1).sum(1).tolist(), recv_counts.view(self.ep, -1).sum(1).tolist()
        rows = all_to_all_single_autograd(x[order // k], recv, send, self.group)
        rows = torch.ops._c10d_functional.wait_tensor(rows) if hasattr(torch.ops, "_c10d_functional") else rows
        local = torch.arange(self.num_local).repeat(self.ep).repeat_interleave(recv_counts)
        out = torch.zeros_like(rows)
        for e in range(self.num_local):
            sel = (local == e).nonzero().squeeze(-1)
            h = rows[sel]
            out = out.index_add(0, sel, F.linear(F.silu(F.linear(h, self.w1[e])) * F.linear(h, self.w3[e]), self.w2[e]))
        back = all_to_all_single_autograd(out, send, recv, self.group)
        pairs = back.index_select(0, torch.argsort(order)).view(*weights.shape, -1)
        return (pairs * weights.unsqueeze(-1)).sum(1)


def _build(shape):
    from tests.moe_model import MoE, MoEModel

    kwargs, tokens = SHAPES[shape]
    torch.manual_seed(0)
    if shape.startswith("layer"):
        skew = (lambda index, experts: index % (experts // 2)) if shape == "layer-skewed" else None
        model = MoE(kwargs["dim"], kwargs["hidden"], kwargs["num_experts"], kwargs["top_k"], route=skew)
        make_input = lambda n: torch.randn(n, tokens[1], kwargs["dim"])  # noqa: E731
        loss = lambda m, out: out.pow(2).mean() + 0.01 * m.aux_loss  # noqa: E731
    else:
        model = MoEModel(**kwargs)
        make_input = lambda n: torch.randint(0, kwargs["vocab"], (n, tokens[1]))  # noqa: E731
        loss = lambda m, out: out.float().logsumexp(-1).mean() + 0.01 * m.aux_loss()  # noqa: E731
    return model, make_input, loss, tokens


def _moe_layers(model):
    return [m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "router")]


class _A2ATimer:
    """dist.all_to_all_single timed per call (dtp's dispatch calls it synchronously)."""

    def __init__(self):
        self.seconds, self.original = 0.0, dist.all_to_all_single

    def __enter__(self):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        dist.all_to_all_single = timed
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self.original


def moe_rank(shape: str, rounds: int, steps: int) -> dict:
    """On each rank: median ms/step of dtp / hand / single (interleaved rounds), dtp's all-to-all share, the pairs
    each rank's experts received per step."""
    import dtp

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    single, make_input, loss_of, tokens = _build(shape)
    ours, hand = copy.deepcopy(single), copy.deepcopy(single)
    dtp.parallelize_module(ours, dtp.init_mesh(tp=world), {  # dense parameters stay plain, as in "hand"
        ("experts" if shape.startswith("layer") else "layers.*.moe.experts"): dtp.ExpertParallel()},
        replicate_rest=False)
    for layer in _moe_layers(hand):
        layer.experts = HandExperts(layer.experts, dist.group.WORLD)
    torch.manual_seed(rank + 1)
    x = make_input(tokens[0])
    torch.manual_seed(100)
    x_all = make_input(tokens[0] * world)

    def step(model, inputs):
        loss_of(model, model(inputs)).backward()
        model.zero_grad(set_to_none=True)

    variants = {"dtp": lambda: step(ours, x), "hand": lambda: step(hand, x)}
    if rank == 0:
        variants["single"] = lambda: step(single, x_all)
    times = {name: [] for name in ("dtp", "hand", "single")}
    with torch.no_grad():  # the three compute the same thing
        torch.testing.assert_close(ours(x), hand(x), rtol=1e-4, atol=1e-4)
    for fn in variants.values():
        fn()  # warm-up
    for r in range(rounds):
        for name in round_order(("dtp", "hand", "single"), r):
            dist.barrier()
            if name not in variants:
                continue
            start = time.perf_counter()
            for _ in range(steps):
                variants[name]()
            times[name].append((time.perf_counter() - start) * 1e3 / steps)
    dist.barrier()
    seen = []
    hook = _moe_layers(ours)[0].experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach()))
    with _A2ATimer() as timer:
        start = time.perf_counter()
        for _ in range(steps):
            step(ours, x)
        total = time.perf_counter() - start
    hook.remove()
    experts = SHAPES[shape][0]["num_experts"]
    per_expert = torch.bincount(seen[-1].reshape(-1), minlength=experts)  # this rank's pairs, by expert (layer 0)
    dist.all_reduce(per_expert)  # the pairs every expert received in one step
    per_rank = per_expert.view(world, -1).sum(1)
    return {"median": {k: statistics.median(v) for k, v in times.items() if v}, "a2a_share": timer.seconds / total,
            "per_expert": per_expert.tolist(), "per_rank": per_rank.tolist(),
            "imbalance": float(per_rank.max() / per_rank.float().mean()), "tokens": tokens}


def table(rows: list) -> str:
    lines = ["| shape | ranks | dtp ms | hand-written ms | 1 process ms (global batch) | dtp / hand-written | speed-up "
             "vs 1 process | all-to-all share of dtp's step | pairs per rank (layer 0) | max / mean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, world, r in rows:
        m = r["median"]
        lines.append(f"| {shape} | {world} | {m['dtp']:.2f} | {m['hand']:.2f} | {m['single']:.2f} | "
                     f"{m['dtp'] / m['hand']:.2f} | {m['single'] / m['dtp']:.2f}x | {100 * r['a2a_share']:.0f}% | "
                     f"{r['per_rank']} | {r['imbalance']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_moe", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["layer", "model"], choices=list(SHAPES))
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    args = parser.parse_args(argv)
    rows = []
    with RankPool(args.world_size, timeout=600.0) as pool:
        for shape in args.shapes:
            rows.append((shape, args.world_size, pool.run(moe_rank, shape, args.rounds, args.steps)[0]))
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
