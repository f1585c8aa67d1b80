"""Train a tensor-parallel MLP for a few steps on CPU and print its loss next to the single-process loss.

    python examples/train_mlp.py                      # starts 2 ranks itself (gloo; nccl with a GPU per rank)
    python examples/train_mlp.py --world-size 4 --backend gloo
    torchrun --nproc_per_node 4 examples/train_mlp.py # or let torchrun start them (rank 0 prints)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import dtp  # noqa: E402
from dtp.launch import add_launch_arguments, launch, rank_device, script_world_size  # noqa: E402


def make_mlp(dim: int, hidden: int) -> nn.Sequential:
    """The single-process model: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def tensor_parallel(mlp: nn.Sequential) -> nn.Sequential:
    """The same MLP, up-projection split by columns, down-projection by rows: one all-reduce each way."""
    return nn.Sequential(
        dtp.ColumnParallelLinear.from_linear(mlp[0], gather_output=False),
        nn.GELU(),
        dtp.RowParallelLinear.from_linear(mlp[2], input_is_parallel=True),
    )


def train(steps: int = 8, dim: int = 32, hidden: int = 128, batch: int = 16) -> list:
    """Train both models on the same data; return [(step, tp loss, single-process loss)]."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every rank draws the same model and data (on the CPU, then moved to its device)
    device = rank_device()
    single = make_mlp(dim, hidden).to(device)
    tp = tensor_parallel(single)
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-2)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-2)
    target = make_mlp(dim, dim).to(device)  # a fixed random function to regress onto
    rows = []
    for step in range(steps):
        x = torch.randn(batch, dim).to(device)
        with torch.no_grad():
            y = target(x)
        for model, opt in ((single, opt_single), (tp, opt_tp)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            model.last_loss = loss.item()
        rows.append((step, tp.last_loss, single.last_loss))
    return rows


def job(steps: int) -> tuple:
    """One rank's part: the rows, with the world size and backend for the printout."""
    return train(steps), dist.get_world_size(), dist.get_backend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_launch_arguments(parser)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    # python: starts the ranks here; torchrun: this process is one rank (bounded collectives, exit on failure)
    result = launch(job, args.steps, world_size=script_world_size(args.world_size), backend=args.backend)
    if result is None:  # a torchrun rank other than 0: rank 0 prints
        return
    rows, world, backend = result
    for step, tp_loss, single_loss in rows:
        print(f"step {step:2d}   tp={world} loss {tp_loss:.6f}   single-process loss {single_loss:.6f}   "
              f"|diff| {abs(tp_loss - single_loss):.1e}")
    worst = max(abs(a - b) for _, a, b in rows)
    print(f"max |tp loss - single-process loss| over {len(rows)} steps on {world} ranks ({backend}): {worst:.2e}")


if __name__ == "__main__":
    main()
