"""`python -m benchmarks.bench_scaling`: where one training step of the medium MLP goes, 1 process vs dtp at 2 ranks, and
what chunked (pipelined) row all-reduces recover.

One run times, interleaved in a fresh random order each round, each block after one untimed step (so
no variant inherits another's cache state): the single process (rank 0 alone); dtp's plan
(Colwise up, Rowwise down); the same model with the row layer replaced by `dtp.ops.overlap`'s chunked function for
each k; the raw math of the step with no autograd and no collective (full size on rank 0 alone, half size on
rank 0 alone and on both ranks at once); and the raw all-reduce of the step's bytes, alone.  Time blocked in
collectives is read by wrapping `torch.distributed.all_reduce` (the call and its `wait()`) in the ranks, for
the timed section only.  Each figure is the median over rounds of a block's mean ms/step; several runs reuse
one pool of ranks and are summarised by the median (and range) of the runs' medians and same-run ratios.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmarks.bench import SHAPES
from dtp.testing import RankPool

__all__ = ["scaling_rank", "main"]


class _Clock:
    """Wall time spent in dist.all_reduce calls and in their works' wait(), and the number of calls."""

    def __init__(self):
        self.ms, self.calls, self._orig = 0.0, 0, None

    def __enter__(self):
        self._orig = orig = dist.all_reduce
        clock = self

        class TimedWork:
            __slots__ = ("work",)

            def __init__(self, work):
                self.work = work

            def wait(self, *args, **kwargs):
                start = time.perf_counter()
                try:
                    return self.work.wait(*args, **kwargs)
                finally:
                    clock.ms += (time.perf_counter() - start) * 1e3

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            start = time.perf_counter()
            work = orig(tensor, op, group=group, async_op=async_op)
            clock.ms += (time.perf_counter() - start) * 1e3
            clock.calls += 1
            return TimedWork(work) if work is not None else None

        dist.all_reduce = all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


class _ChunkedMLP(nn.Module):
    """dtp's parallelized MLP with only the row layer swapped for dtp.ops.overlap's chunked function (same parameters)."""

    def __init__(self, model: nn.Module, chunks: int):
        super().__init__()
        self.col, self.act, self.row, self.chunks = model[0], model[1], model[2], chunks
        self.group = self.row.weight.device_mesh.get_group()

    def forward(self, x):
        from dtp.ops.overlap import ChunkedRowLinearFn

        return ChunkedRowLinearFn.apply(self.act(self.col(x)), self.row.weight, self.row.bias, self.group, self.chunks)


def _raw_math(x, w1, b1, w2, b2):
    """The step's arithmetic with no autograd and no collective: fwd addmm, GELU, mm; bwd of mean(y²) to W1, b1, W2, b2."""
    with torch.no_grad():
        pre = torch.addmm(b1, x, w1.t())
        h = F.gelu(pre)
        y = torch.mm(h, w2.t()).add_(b2)  # (dtp all-reduces y here)
        g = y * (2.0 / y.numel())
        g.t().mm(h), g.sum(0)
        dpre = torch.ops.aten.gelu_backward(g.mm(w2), pre)
        dpre.t().mm(x), dpre.sum(0)


def _step(model, x):
    model(x).pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def _local(t):
    return t.to_local().detach() if hasattr(t, "to_local") else t.detach()


def scaling_rank(rounds: int, steps: int, chunks: tuple) -> dict:
    """Run on both ranks: interleaved timing of every variant; returns {variant: [ms/step per round]}, blocked ms and calls."""
    import dtp

    torch.set_num_threads(1)
    shape = SHAPES["medium"]
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(shape["dim"], shape["hidden"]), nn.GELU(), nn.Linear(shape["hidden"], shape["dim"]))
    x = torch.randn(shape["batch"], shape["dim"])
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(),
                                   {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()})
    half = [_local(t) for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias)]
    full = [t.detach() for t in (single[0].weight, single[0].bias, single[2].weight, single[2].bias)]
    reduce_buf = torch.randn(shape["batch"], shape["dim"])
    rank0 = dist.get_rank() == 0
    variants = {  # name: (work for one step, runs on every rank (else rank 0 alone while the others wait))
        "single": (lambda: _step(single, x), False),
        "dtp": (lambda: _step(model, x), True),
        **{f"chunks={k}": (lambda m=_ChunkedMLP(model, k): _step(m, x), True) for k in chunks},
        "math_full_alone": (lambda: _raw_math(x, *full), False),
        "math_half_alone": (lambda: _raw_math(x, *half), False),
        "math_half_both": (lambda: _raw_math(x, *half), True),
        "allreduce_alone": (lambda: dist.all_reduce(reduce_buf), True),
    }
    for fn, everywhere in variants.values():  # warm-up
        if everywhere or rank0:
            for _ in range(3):
                fn()
        dist.barrier()
    times = {n: [] for n in variants}
    cpu = {n: [] for n in variants}
    blocked = {n: [] for n in variants}
    calls = {n: 0 for n in variants}
    order = random.Random(0)  # the same shuffles on every rank
    load = os.getloadavg()[0]
    with _Clock() as clock:
        for _ in range(rounds):
            names = list(variants)
            order.shuffle(names)  # a fresh order each round: no variant always follows the same one
            for name in names:
                fn, everywhere = variants[name]
                if everywhere or rank0:
                    fn()  # one untimed step first: caches hold this variant's weights, not the previous one's
                dist.barrier()
                ms0, calls0 = clock.ms, clock.calls  # (after the untimed step)
                start, cpu_start = time.perf_counter(), time.thread_time()
                if everywhere or rank0:
                    for _ in range(steps):
                        fn()
                wall = time.perf_counter() - start
                cpu[name].append((time.thread_time() - cpu_start) / steps * 1e3)
                dist.barrier()
                times[name].append(wall / steps * 1e3)
                blocked[name].append((clock.ms - ms0) / steps)
                calls[name] += clock.calls - calls0
    return {"times": times, "blocked": blocked, "cpu": cpu,
            "calls_per_step": {n: c / (rounds * steps) for n, c in calls.items()},
            "load": (load, os.getloadavg()[0])}


def _med(values) -> tuple:
    return statistics.median(values), min(values), max(values)


def _summary(runs: list, chunks: tuple) -> dict:
    """Median (min, max) over runs of each run's per-variant medians and of same-run derived figures and ratios.

    One rank's step wall time splits exactly into: compute CPU (main-thread CPU of the raw math), framework CPU
    (the step's main-thread CPU minus that), blocked in all_reduce, and the rest: runnable but not running
    (the 2 cores taken by the other rank, gloo's threads or other processes)."""
    names = list(runs[0][0]["times"])
    derived = []
    for ranks in runs:
        d = {}
        for rank, r in enumerate(ranks):
            m = {k: {n: statistics.median(v) for n, v in r[k].items()} for k in ("times", "cpu", "blocked")}
            wall, cpu, blocked = m["times"], m["cpu"], m["blocked"]
            for n in names:
                d[f"wall {n} r{rank}"], d[f"cpu {n} r{rank}"], d[f"blocked {n} r{rank}"] = wall[n], cpu[n], blocked[n]
            for n, math in [("single", "math_full_alone"), ("dtp", "math_half_both")] + [
                    (f"chunks={k}", "math_half_both") for k in chunks]:
                d[f"compute {n} r{rank}"] = cpu[math]
                d[f"framework {n} r{rank}"] = cpu[n] - cpu[math]
                d[f"waiting {n} r{rank}"] = wall[n] - cpu[n] - blocked[n]
        t = {n: statistics.median(v) for n, v in ranks[0]["times"].items()}
        d["speedup dtp"] = t["single"] / t["dtp"]
        d["compute bound"] = t["math_full_alone"] / t["math_half_both"]
        d["math both/alone"] = t["math_half_both"] / t["math_half_alone"]
        for k in chunks:
            d[f"chunks={k}/dtp"] = t[f"chunks={k}"] / t["dtp"]
            d[f"speedup chunks={k}"] = t["single"] / t[f"chunks={k}"]
        derived.append(d)
    return {"runs": len(runs), "fig": {k: _med([d[k] for d in derived]) for k in derived[0]},
            "calls_per_step": runs[0][0]["calls_per_step"], "load": [ranks[0]["load"] for ranks in runs]}


def _fmt(m) -> str:
    return f"{m[0]:.2f} ({m[1]:.2f}–{m[2]:.2f})" if m[1] != m[2] else f"{m[0]:.2f}"


def _tables(s: dict, chunks: tuple) -> str:
    f, calls, shape = s["fig"], s["calls_per_step"], SHAPES["medium"]
    rows = [("whole step: wall", "wall"), ("compute: main-thread CPU of the raw matmuls + GELU", "compute"),
            ("framework: the rest of the main thread's CPU (autograd, DTensor, Python)", "framework"),
            ("communication: blocked in all_reduce (call + wait)", "blocked"),
            ("runnable, not running (cores busy: other rank, gloo threads, other processes)", "waiting")]
    lines = [f"medium MLP {shape['dim']}→{shape['hidden']}→{shape['dim']}, batch {shape['batch']}, forward + backward; "
             f"ms per step: median of {s['runs']} run(s) (min–max over runs)", "",
             "| part of one step | 1 process | dtp, 2 ranks: rank 0 | rank 1 |", "|---|---|---|---|"]
    for label, key in rows:
        one = "0" if key == "blocked" else _fmt(f[f"{key} single r0"])
        lines.append(f"| {label} | {one} | {_fmt(f[f'{key} dtp r0'])} | {_fmt(f[f'{key} dtp r1'])} |")
    lines += [f"| raw math timed by wall clock: alone / both ranks at once | {_fmt(f['wall math_full_alone r0'])} | "
              f"{_fmt(f['wall math_half_alone r0'])} / {_fmt(f['wall math_half_both r0'])} | "
              f"– / {_fmt(f['wall math_half_both r1'])} |",
              f"| the same all-reduce ({shape['batch']}×{shape['dim']} fp32, {calls['dtp']:.0f} per step) timed alone | – | "
              f"{_fmt(f['wall allreduce_alone r0'])} | {_fmt(f['wall allreduce_alone r1'])} |", "",
              f"speed-up vs 1 process: dtp **{_fmt(f['speedup dtp'])}×**; compute-only bound (full math alone / half "
              f"math on both ranks at once, wall) {_fmt(f['compute bound'])}×; half math on both ranks / alone "
              f"{_fmt(f['math both/alone'])}", "",
              "| variant | ms/step | / dtp (same run) | speed-up vs 1 process | blocked ms rank 0 / 1 | all-reduces/step |",
              "|---|---|---|---|---|---|",
              f"| dtp (RowLinearFn: 1 all-reduce) | {_fmt(f['wall dtp r0'])} | 1 | {_fmt(f['speedup dtp'])}× | "
              f"{f['blocked dtp r0'][0]:.2f} / {f['blocked dtp r1'][0]:.2f} | {calls['dtp']:.0f} |"]
    for k in chunks:
        n = f"chunks={k}"
        lines.append(f"| dtp.ops.overlap, k={k} | {_fmt(f[f'wall {n} r0'])} | {_fmt(f[n + '/dtp'])} | "
                     f"{_fmt(f['speedup ' + n])}× | {f[f'blocked {n} r0'][0]:.2f} / {f[f'blocked {n} r1'][0]:.2f} | "
                     f"{calls[n]:.0f} |")
    lines += ["", "load average (1 min) at start/end of each run: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in s["load"])]
    return "\n".join(lines)


def _idle_fraction(seconds: float = 1.0) -> float:
    """Share of all cores idle over the next `seconds` (from /proc/stat; 1.0 where it cannot be read)."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return 1.0
    return (idle1 - idle0) / max(1, total1 - total0)


def _wait_idle(threshold: float, limit_s: float) -> float:
    """Wait (at most limit_s) until the cores are at least `threshold` idle over one second; return the last share."""
    deadline = time.monotonic() + limit_s
    idle = _idle_fraction()
    while idle < threshold and time.monotonic() < deadline:
        idle = _idle_fraction()
    return idle


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs on one pool of 2 ranks (default 5)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per run (default 15)")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed block (default 4)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before each run wait up to SECONDS for the cores to be >= 80%% idle (shared machines)")
    parser.add_argument("--json", help="also write the summary as JSON to this file")
    args = parser.parse_args(argv)
    chunks = tuple(args.chunks)
    runs, idles = [], []
    with RankPool(2, timeout=1800) as pool:
        for i in range(args.runs):
            idle = _wait_idle(0.8, args.wait_idle) if args.wait_idle else _idle_fraction(0.5)
            idles.append(idle)
            runs.append(pool.run(scaling_rank, args.rounds, args.steps, chunks))
            one = _summary(runs[-1:], chunks)
            print(f"run {i + 1}/{args.runs}: ms/step " + ", ".join(
                f"{n} {one['fig'][f'wall {n} r0'][0]:.2f}" for n in runs[-1][0]["times"])
                + f"; cores idle before: {idle:.0%}", flush=True)
    summary = _summary(runs, chunks)
    print(f"\n{datetime.date.today()}, torch {torch.__version__}, gloo, 2 ranks x 1 thread, {os.cpu_count()} cores\n")
    print(_tables(summary, chunks))
    print("cores idle just before each run: " + ", ".join(f"{i:.0%}" for i in idles))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "idle_before": idles, "runs": runs}, f)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
