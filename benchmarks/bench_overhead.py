"""`python -m benchmarks.bench_overhead`: dtp's price over hand-written Megatron code, forward and backward separately.

dtp and the hand-written version (`benchmarks.bench_reference`) of one benchmark shape alternate step by
step (A B, B A, ...), every step timed in two parts (forward, backward); the figure is the median of
the per-step differences dtp − hand-written, in microseconds, so machine noise common to a pair of
steps cancels.  With one rank there is no communication: the difference is framework work alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from dtp.testing import run_on_ranks

__all__ = ["overhead_rank", "main"]


def _timed_step(model, x) -> tuple[float, float]:
    start = time.perf_counter()
    loss = model(x).float().pow(2).mean()
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    for p in model.parameters():
        p.grad = None
    return mid - start, end - mid


def overhead_rank(shape_name: str, steps: int) -> dict:
    """Run on every rank: {variant: (forward µs, backward µs) medians, "dtp - hand": median per-step differences}."""
    from benchmarks.bench import SHAPES, _models

    torch.set_num_threads(1)
    x, variants, _ = _models(SHAPES[shape_name], torch.device("cpu"))
    models = {"dtp": variants["dtp"], "hand": variants["hand"]}
    for model in models.values():
        for _ in range(5):
            _timed_step(model, x)
    times = {name: [] for name in models}
    for i in range(steps):
        for name in (("dtp", "hand") if i % 2 else ("hand", "dtp")):
            if dist.get_world_size() > 1:
                dist.barrier()
            times[name].append(_timed_step(models[name], x))

    def us(values):
        return round(statistics.median(values) * 1e6)

    out = {name: (us(t[0] for t in ts), us(t[1] for t in ts)) for name, ts in times.items()}
    out["dtp - hand"] = tuple(us(a[k] - b[k] for a, b in zip(times["dtp"], times["hand"])) for k in (0, 1))
    return out


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["small", "block"], choices=["small", "medium", "block"])
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    rows = []
    print("| shape | ranks | dtp fwd / bwd µs | hand fwd / bwd µs | dtp − hand fwd / bwd µs (median per step) |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        for world in args.world_sizes:
            r = run_on_ranks(overhead_rank, world, shape, args.steps, timeout=1800)[0]
            rows.append({"shape": shape, "world_size": world, **r})
            (df, db), (hf, hb), (xf, xb) = r["dtp"], r["hand"], r["dtp - hand"]
            print(f"| {shape} | {world} | {df} / {db} | {hf} / {hb} | **{xf:+d} / {xb:+d}** |", flush=True)
    return rows


if __name__ == "__main__":
    main()
