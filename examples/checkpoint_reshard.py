"""Train as dp=2 x tp=N/2 (TP x FSDP2), save a sharded checkpoint, reload it at another tp and keep training: the
losses match a run that never stopped.

    python examples/checkpoint_reshard.py                  # 4 ranks as dp=2 x tp=2, then 4 new ranks at tp=4
    python examples/checkpoint_reshard.py --reload-tp 1    # ... reloaded in one process
    torchrun --nproc_per_node 4 examples/checkpoint_reshard.py                 # dp=2 x tp=2, reloaded at tp=4
    torchrun --nproc_per_node 4 examples/checkpoint_reshard.py --reload-tp 2   # ... as 2 replicas of tp=2

Under torchrun no ranks are started here: the save and the reload both run on torchrun's WORLD_SIZE ranks, the
reload at tp=--reload-tp (a divisor of WORLD_SIZE; default WORLD_SIZE) on WORLD_SIZE / tp sub-meshes, each a whole
replica that loads the checkpoint and trains on the full batch.  An odd world size saves at tp=WORLD_SIZE (and
reloads at tp=1 by default).  Across machines, pass --path on storage that every node sees.
"""

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dtp  # noqa: E402
from dtp.launch import add_launch_arguments, launch, rank_device, script_world_size, under_torchrun  # noqa: E402
from dtp.testing import run_on_ranks  # noqa: E402
from examples.gpt import GPT, GPTConfig, tp_plan  # noqa: E402

CFG = GPTConfig(vocab_size=64, dim=32, n_heads=4, n_layers=2, hidden=64)
BATCH, SEQ = 8, 12


def batch(step: int):
    """The global batch of a step: the same on every rank and in every layout."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, CFG.vocab_size, (BATCH, 1), generator=g)
    ids = (start + torch.arange(SEQ + 1) * 3) % CFG.vocab_size
    return ids[:, :-1], ids[:, 1:]


def first_layout(world: int) -> str:
    """The first run's layout: dp=2 x tp=world/2 (TP x FSDP2) for an even world size, else tp=world."""
    return f"dp=2 x tp={world // 2}" if world % 2 == 0 else f"tp={world}"


def build(layout: str, tp: int | None = None):
    """Layout "2d": dp=2 x tp=world/2, FSDP2 on dp; "tp": world/tp replicas of tp (default world) on sub-meshes."""
    torch.manual_seed(0)
    model = GPT(CFG).to(rank_device())
    world = dist.get_world_size()
    if layout == "2d":
        mesh = dtp.init_mesh(dp=2, tp=world // 2)
        dtp.parallelize_2d(model, mesh, tp_plan(), fsdp_units=["layers.*"])
        dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    else:
        mesh = dtp.init_mesh(tp=tp or world)  # ("dp", "tp") when tp < world: a tp group per replica
        dtp.parallelize_module(model, mesh["tp"] if mesh.ndim == 2 else mesh, tp_plan())
        dp, dp_rank = 1, 0  # each replica trains on the full batch
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3), dp, dp_rank


def train_steps(model, opt, dp, dp_rank, steps) -> list:
    losses = []
    for step in steps:
        inputs, targets = (t.chunk(dp)[dp_rank].to(rank_device()) for t in batch(step))
        loss = dtp.vocab_parallel_cross_entropy(model(inputs), targets)
        opt.zero_grad()
        loss.backward()
        dtp.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        mean = loss.detach().clone()
        if dp > 1:  # the global batch's loss: the mean of the micro-batch losses (tp ranks repeat theirs)
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        losses.append(mean.item())
    return losses


def first_run(path: str, save_at: int, total: int) -> list:
    """dp=2 x tp=world/2 (tp=world if odd): train, save after save_at steps, and keep going (never stopped)."""
    torch.set_num_threads(1)
    model, opt, dp, dp_rank = build("2d" if dist.get_world_size() % 2 == 0 else "tp")
    losses = train_steps(model, opt, dp, dp_rank, range(save_at))
    dtp.save_checkpoint(path, model, opt)
    return losses + train_steps(model, opt, dp, dp_rank, range(save_at, total))


def resumed_run(path: str, save_at: int, total: int, tp: int | None = None) -> list:
    """tp (default: the world size) on every tp group of the ranks: load the checkpoint (resharded), continue."""
    torch.set_num_threads(1)
    model, opt, dp, dp_rank = build("tp", tp)
    dtp.load_checkpoint(path, model, opt)
    return train_steps(model, opt, dp, dp_rank, range(save_at, total))


def torchrun_job(path: str | None, save_at: int, total: int, reload_tp: int) -> tuple:
    """Both runs on torchrun's ranks, into one directory (a temporary one on rank 0's machine unless path is given)."""
    tmp = None
    if path is None:
        if dist.get_world_size() != int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())):
            raise ValueError("across machines, pass --path: a checkpoint directory on storage every node sees")
        shared = [tempfile.mkdtemp(prefix="dtp_ckpt_") if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(shared)
        tmp = shared[0]
        path = os.path.join(tmp, "ckpt")
    try:
        straight = first_run(path, save_at, total)
        resumed = resumed_run(path, save_at, total, reload_tp)
        dist.barrier()  # every rank has finished reading before rank 0 removes the directory
    finally:
        if tmp is not None and dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return straight, resumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_launch_arguments(parser, default_world_size=4)
    parser.add_argument("--reload-tp", "--reload-world", dest="reload_tp", type=int, default=None,
                        help="tp of the reload (default: the world size if even, else 1); python: that many new "
                             "ranks; torchrun: a divisor of WORLD_SIZE (WORLD_SIZE / tp replicas)")
    parser.add_argument("--save-at", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--path", default=None, help="checkpoint directory (default: a temporary one, removed)")
    args = parser.parse_args()
    world = script_world_size(args.world_size, default=4)
    reload_tp = args.reload_tp or (world if world % 2 == 0 else 1)
    if reload_tp < 1 or (under_torchrun() and world % reload_tp):
        parser.error(f"--reload-tp {reload_tp} must be a positive divisor of the world size {world} under torchrun")
    if under_torchrun():
        result = launch(torchrun_job, args.path, args.save_at, args.steps, reload_tp, world_size=world,
                        backend=args.backend)
        if result is None:  # a rank other than 0: rank 0 prints
            return
        straight, resumed = result
        replicas = f" ({world // reload_tp} replicas)" if reload_tp < world else ""
        where = f"the same {world} torchrun ranks{replicas}"
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.path or os.path.join(tmp, "ckpt")
            straight = run_on_ranks(first_run, world, path, args.save_at, args.steps, backend=args.backend)[0]
            resumed = run_on_ranks(resumed_run, reload_tp, path, args.save_at, args.steps, backend=args.backend)[0]
        where = f"{reload_tp} new rank{'s' if reload_tp > 1 else ''}"
    print(f"trained {first_layout(world)} on {world} ranks, saved after step {args.save_at - 1}, "
          f"reloaded as tp={reload_tp} on {where}")
    for step, loss in enumerate(straight):
        again = resumed[step - args.save_at] if step >= args.save_at else None
        note = "" if again is None else f"   resumed at tp={reload_tp}: {again:.6f}   |diff| {abs(again - loss):.1e}"
        print(f"step {step:2d}   never stopped: {loss:.6f}{note}")


if __name__ == "__main__":
    main()
