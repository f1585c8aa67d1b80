"""Train on 4 CPU ranks as dp=2 x tp=2 (TP x FSDP2), save a sharded checkpoint, reload it as tp=4 (or in one
process) and keep training: the losses match a run that never stopped.

    python examples/checkpoint_reshard.py                 # 4 ranks, then reload at tp=4
    python examples/checkpoint_reshard.py --reload-world 1
"""

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import dtp  # noqa: E402
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


def build(layout: str):
    torch.manual_seed(0)
    model = GPT(CFG)
    if layout == "2d":
        mesh = dtp.init_mesh(dp=2, tp=dist.get_world_size() // 2)
        dtp.parallelize_2d(model, mesh, tp_plan(), fsdp_units=["layers.*"])
        dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    else:
        dtp.parallelize_module(model, dtp.init_mesh(tp=dist.get_world_size()), tp_plan())
        dp, dp_rank = 1, 0
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3), dp, dp_rank


def train_steps(model, opt, dp, dp_rank, steps) -> list:
    losses = []
    for step in steps:
        inputs, targets = (t.chunk(dp)[dp_rank] for t in batch(step))
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
    """dp=2 x tp=2: train, save after save_at steps, and keep going (the run that never stopped)."""
    torch.set_num_threads(1)
    model, opt, dp, dp_rank = build("2d")
    losses = train_steps(model, opt, dp, dp_rank, range(save_at))
    dtp.save_checkpoint(path, model, opt)
    return losses + train_steps(model, opt, dp, dp_rank, range(save_at, total))


def resumed_run(path: str, save_at: int, total: int) -> list:
    """Any tp layout: load the checkpoint (resharded) and continue from step save_at."""
    torch.set_num_threads(1)
    model, opt, dp, dp_rank = build("tp")
    dtp.load_checkpoint(path, model, opt)
    return train_steps(model, opt, dp, dp_rank, range(save_at, total))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reload-world", type=int, default=4)
    parser.add_argument("--save-at", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt")
        straight = run_on_ranks(first_run, 4, path, args.save_at, args.steps)[0]
        resumed = run_on_ranks(resumed_run, args.reload_world, path, args.save_at, args.steps)[0]
    print(f"trained dp=2 x tp=2, saved after step {args.save_at - 1}, reloaded as tp={args.reload_world}")
    for step, loss in enumerate(straight):
        again = resumed[step - args.save_at] if step >= args.save_at else None
        note = "" if again is None else f"   resumed at tp={args.reload_world}: {again:.6f}   |diff| {abs(again - loss):.1e}"
        print(f"step {step:2d}   never stopped: {loss:.6f}{note}")


if __name__ == "__main__":
    main()
