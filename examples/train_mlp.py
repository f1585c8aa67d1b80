"""Train a tensor-parallel MLP for a few steps on CPU and print its loss next to the single-process loss.

    python examples/train_mlp.py                      # starts 2 gloo ranks itself
    python examples/train_mlp.py --world-size 4
    torchrun --nproc_per_node 4 examples/train_mlp.py # or let torchrun start them
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import dtp  # noqa: E402
from dtp.testing import run_on_ranks, run_under_torchrun  # noqa: E402


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
    torch.manual_seed(0)  # every rank draws the same model and data
    single = make_mlp(dim, hidden)
    tp = tensor_parallel(single)
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-2)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=1e-2)
    target = make_mlp(dim, dim)  # a fixed random function to regress onto
    rows = []
    for step in range(steps):
        x = torch.randn(batch, dim)
        with torch.no_grad():
            y = target(x)
        for model, opt in ((single, opt_single), (tp, opt_tp)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            model.last_loss = loss.item()
        rows.append((step, tp.last_loss, single.last_loss))
        if dist.get_rank() == 0:
            print(f"step {step:2d}   tp={dist.get_world_size()} loss {tp.last_loss:.6f}   "
                  f"single-process loss {single.last_loss:.6f}   |diff| {abs(tp.last_loss - single.last_loss):.1e}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    if "RANK" in os.environ:  # under torchrun: this process is one rank; bounded collectives, exit on failure
        run_under_torchrun(train, args.steps)
    else:
        rows = run_on_ranks(train, args.world_size, args.steps)[0]
        worst = max(abs(a - b) for _, a, b in rows)
        print(f"max |tp loss - single-process loss| over {len(rows)} steps: {worst:.2e}")


if __name__ == "__main__":
    main()
