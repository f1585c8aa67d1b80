"""`python -m benchmarks.bench`: same-run step times of dtp, torch's parallelize_module, hand-written Megatron and one process.

Variants are interleaved, in an order shuffled afresh each round (the same on every rank), so machine noise and
whatever ran just before (a cold cache after the one-process variant, say) hit them alike; each timing is
the median over rounds of the mean step time (forward + backward, optionally optimizer step) of a
block of steps, with its spread (min-max over rounds).  Ratios are of medians of the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.tensor.parallel as torch_tp
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from benchmarks.bench_reference import HandBlock, HandLlama, HandMLP
from benchmarks.interleave import round_order
from dtp.mesh import default_mesh
from dtp.plan.parallelize import parallelize_module
from benchmarks.report import format_compiled_table, format_table, table_row
from dtp.testing import run_on_ranks

__all__ = ["SHAPES", "bench_rank", "main"]

SHAPES = {  # rounds: enough that a milliseconds-long step still gets hundreds of samples per variant
    "small": dict(kind="mlp", dim=64, hidden=256, batch=8, rounds=150),
    "medium": dict(kind="mlp", dim=1024, hidden=4096, batch=32, rounds=25),
    "block": dict(kind="block", dim=256, hidden=1024, heads=8, batch=4, seq=64, rounds=25),
    "llama": dict(kind="llama", dim=256, heads=8, kv_heads=4, batch=4, seq=64, sp=False, rounds=25),
    "llama-sp": dict(kind="llama", dim=256, heads=8, kv_heads=4, batch=4, seq=64, sp=True, rounds=25),
}
VARIANTS = ("dtp", "torch", "hand", "single")


def _mlp_plan(styles):
    return {"0": styles.ColwiseParallel(), "2": styles.RowwiseParallel()}


def _block_plan(styles):
    replicated = styles.PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
    return {"attention": replicated, "attention.w[qkv]": styles.ColwiseParallel(),
            "attention.wo": styles.RowwiseParallel(), "mlp": copy.deepcopy(replicated),
            "mlp.up": styles.ColwiseParallel(), "mlp.down": styles.RowwiseParallel()}


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def _llama_variants(shape: dict, device: torch.device, mesh):
    """A one-block torchtitan Llama through apply_tp's two calls (root, then the block): dtp and torch."""
    import dtp
    from examples.llama import Llama, LlamaConfig, apply_tp

    cfg = LlamaConfig(vocab_size=256, dim=shape["dim"], n_layers=1, n_heads=shape["heads"], n_kv_heads=shape["kv_heads"])
    single = Llama(cfg).to(device)
    x = torch.randint(0, cfg.vocab_size, (shape["batch"], shape["seq"]), device=device)
    tp = dict(loss_parallel=False, enable_sp=shape["sp"])
    (ours, plan_dtp), (theirs, plan_torch) = (
        _timed(lambda: apply_tp(copy.deepcopy(single), mesh, styles=dtp, **tp)),
        _timed(lambda: apply_tp(copy.deepcopy(single), mesh, styles=torch_tp, **tp)))
    _, plan_local = _timed(lambda: apply_tp(copy.deepcopy(single), mesh, styles=dtp, **tp,
                                            parallelize_module=partial(dtp.parallelize_module, src_data_rank=None)))
    plan_ms = {"dtp": plan_dtp, "dtp_local": plan_local, "torch": plan_torch}
    variants = {"dtp": ours, "torch": theirs, "single": single}
    if not shape["sp"]:
        variants["hand"] = HandLlama(copy.deepcopy(single))
    return x, variants, plan_ms


def _compiled(variants: dict, plan_ms: dict, fresh, x) -> None:
    """Add torch.compile(fullgraph=True) (inductor) copies of dtp and torch TP, each parallelized afresh by fresh(name);
    their compile time (the first forward + backward) is measured during warm-up: each compiles from scratch (no
    FX-graph / autograd cache hit from the other's identical graphs, and each with its own empty kernel caches) after
    a throw-away compile of one more copy of each has loaded inductor and run both tracings once: whichever compiled
    first would otherwise pay the first-time costs alone (~1-2 s on the block), or a warm-up of one kind only favour it."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = False
    for name in ("dtp", "torch"):
        _step(torch.compile(fresh(name), fullgraph=True), x, None)
    torch._dynamo.reset()
    for name in ("dtp", "torch"):
        variants[f"{name}_compiled"] = torch.compile(fresh(name), fullgraph=True)
        plan_ms[f"{name}_compiled"] = 0.0


def _fresh_inductor_caches() -> None:
    """A new, empty inductor cache directory and empty in-memory code caches: the next compile builds every kernel
    itself (otherwise whichever variant compiles second reuses the first one's identical C++ kernels, ~3 s here)."""
    import tempfile

    import torch._inductor.codecache as codecache

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dtp_bench_inductor_")
    for name in ("PyCodeCache", "CppCodeCache", "CppPythonBindingsCodeCache", "CppWrapperCodeCache"):
        cache = getattr(codecache, name, None)
        if cache is not None and hasattr(cache, "cache_clear"):
            cache.cache_clear()


def _models(shape: dict, device: torch.device, compile_: bool = False):
    """(input batch, {variant: model}, {variant: ms to parallelize}) for one shape, all from one seed."""
    import dtp

    torch.manual_seed(0)
    mesh = default_mesh()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout: examples/
    # DTensor's first op imports its fake-tensor machinery (~0.7 s, once per process): not a plan's cost
    DTensor.from_local(torch.zeros(1, device=device), mesh, [Replicate()], run_check=False).detach()
    if shape["kind"] == "llama":
        x, variants, plan_ms = _llama_variants(shape, device, mesh)
        if compile_:
            from examples.llama import apply_tp
            single, tp = variants["single"], dict(loss_parallel=False, enable_sp=shape["sp"])
            _compiled(variants, plan_ms, lambda name: apply_tp(copy.deepcopy(single), mesh, **tp,
                                                               styles=dtp if name == "dtp" else torch_tp), x)
        return x, variants, plan_ms
    if shape["kind"] == "mlp":
        single = nn.Sequential(nn.Linear(shape["dim"], shape["hidden"]), nn.GELU(),
                               nn.Linear(shape["hidden"], shape["dim"])).to(device)
        x = torch.randn(shape["batch"], shape["dim"], device=device)
        plan, hand = _mlp_plan, HandMLP
    else:
        from examples.gpt import Block, GPTConfig

        cfg = GPTConfig(dim=shape["dim"], n_heads=shape["heads"], hidden=shape["hidden"])
        single = Block(cfg).to(device)
        x = torch.randn(shape["batch"], shape["seq"], shape["dim"], device=device)
        plan, hand = _block_plan, HandBlock
    (ours, plan_dtp), (theirs, plan_torch) = (
        _timed(lambda: parallelize_module(copy.deepcopy(single), mesh, plan(dtp))),
        _timed(lambda: torch_tp.parallelize_module(copy.deepcopy(single), mesh, plan(torch_tp))))
    _, plan_local = _timed(lambda: parallelize_module(copy.deepcopy(single), mesh, plan(dtp), src_data_rank=None))
    variants = {"dtp": ours, "torch": theirs, "hand": hand(copy.deepcopy(single)), "single": single}
    plan_ms = {"dtp": plan_dtp, "dtp_local": plan_local, "torch": plan_torch}
    if compile_:
        _compiled(variants, plan_ms, lambda name: (parallelize_module if name == "dtp" else torch_tp.parallelize_module)(
            copy.deepcopy(single), mesh, plan(dtp if name == "dtp" else torch_tp)), x)
    return x, variants, plan_ms


def _step(model, x, opt):
    out = model(x)
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    out.float().pow(2).mean().backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    else:
        for p in model.parameters():
            p.grad = None


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _profile(variants: dict, x, opts: dict, steps: int, top: int = 12) -> dict:
    """{variant: table}: where rank 0's CPU time goes in `steps` steps of each distributed variant (torch.profiler,
    self time per op, collectives' waits included), so the gap between dtp and hand-written code can be read off."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for name, model in variants.items():
        if name == "single":
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                _step(model, x, opts[name])
        if dist.get_rank() == 0:
            tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        dist.barrier()
    return tables


def bench_rank(shape_name: str, rounds: int | None = None, steps: int = 4, optimizer: bool = False,
               profile: bool = False, compile_: bool = False) -> dict:
    """Run on every rank: interleaved timing of the variants; returns rank 0's medians and spreads (ms/step)."""
    torch.set_num_threads(1)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    shape = SHAPES[shape_name]
    rounds = rounds or shape["rounds"]
    x, variants, plan_ms = _models(shape, device, compile_)
    opts = {name: (torch.optim.AdamW(m.parameters(), lr=1e-4) if optimizer else None) for name, m in variants.items()}
    times = {name: [] for name in variants}
    rank0 = dist.get_rank() == 0
    for name, model in variants.items():  # warm-up, in the same order
        if name != "single" or rank0:
            for i in range(3):
                if i == 0 and name.endswith("_compiled"):
                    _fresh_inductor_caches()
                _, ms = _timed(lambda: _step(model, x, opts[name]))
                if i == 0 and name.endswith("_compiled"):  # the first step traces and compiles
                    plan_ms[name] = ms
        _sync(device)
    order = list(variants)
    for round_ in range(rounds):
        for name in round_order(order, round_):  # interleaved, in a fresh order each round
            model = variants[name]
            _sync(device)
            start = time.perf_counter()
            if name != "single" or rank0:  # the single process runs alone; the other ranks wait
                for _ in range(steps):
                    _step(model, x, opts[name])
            _sync(device)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    params = {name: sum(_local_bytes(p) for p in m.parameters()) for name, m in variants.items()}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, CPU
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    tables = _profile(variants, x, opts, steps * 5) if profile else {}
    return {"median": {n: statistics.median(t) for n, t in times.items()}, "plan_ms": plan_ms, "profile": tables,
            "spread": {n: (min(t), max(t)) for n, t in times.items()},
            "param_mib": {n: b / 2**20 for n, b in params.items()}, "peak_mib": peak}


def _local_bytes(p) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.numel() * local.element_size()


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--rounds", type=int, default=None, help="default: per shape (150 small, 25 others)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optimizer", action="store_true", help="include an AdamW step in each timed step")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, print where each distributed variant's CPU time goes (torch.profiler)")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile(fullgraph=True) dtp and torch TP variants (inductor) and their compile time")
    parser.add_argument("--json", help="also write the rows as JSON to this file ('-' for stdout)")
    args = parser.parse_args(argv)
    rows = []
    for world in args.world_sizes:
        for shape in args.shapes:
            result = run_on_ranks(bench_rank, world, shape, args.rounds, args.steps, args.optimizer, args.profile,
                                  args.compile, timeout=1800)[0]
            for variant, table in result["profile"].items():
                print(f"\n--- profile: {shape}, {world} ranks, {variant} (rank 0, self CPU time) ---\n{table}", flush=True)
            from dtp.testing import pick_backend
            rows.append(table_row(shape, world, pick_backend(world), result))
            print(format_table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else format_table(rows), flush=True)
    print("\nmedian ms per step (forward + backward%s), rounds x %d steps, variants interleaved\n"
          % (" + AdamW" if args.optimizer else "", args.steps))
    print(format_table(rows))
    if args.compile:
        print("\ncompiled (torch.compile fullgraph=True, inductor) vs eager, same run; compile s = first step\n")
        print(format_compiled_table(rows))
    if args.json:
        text = json.dumps(rows, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
