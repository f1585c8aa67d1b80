"""Train the small GPT tensor-parallel (through its plan only) next to the single-process model, step by step.

    python examples/train_gpt.py                          # tp=2, starts its own ranks (gloo; nccl with a GPU each)
    python examples/train_gpt.py --world-size 4 --sequence-parallel
    torchrun --nproc_per_node 4 examples/train_gpt.py     # or let torchrun start the ranks (rank 0 prints)
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a plain checkout

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import dtp  # noqa: E402
from dtp.launch import add_launch_arguments, launch, rank_device, script_world_size  # noqa: E402
from examples.gpt import GPT, GPTConfig, tp_plan  # noqa: E402


def train(steps: int = 30, sequence_parallel: bool = False, batch: int = 4, seq: int = 16) -> list:
    """Both models see the same batches; returns [(step, tp loss, single-process loss)]."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # every rank builds the same model and draws the same data
    cfg = GPTConfig(vocab_size=128, dim=64, n_heads=4, n_layers=2, hidden=256)
    device = rank_device()
    single = GPT(cfg).to(device)
    tp = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), tp_plan(sequence_parallel))
    opt_single = torch.optim.AdamW(single.parameters(), lr=3e-3)
    opt_tp = torch.optim.AdamW(tp.parameters(), lr=3e-3)
    # a learnable toy language: each token is the previous one plus one, modulo the vocabulary
    rows = []
    for step in range(steps):
        start = torch.randint(0, cfg.vocab_size, (batch, 1))
        ids = ((start + torch.arange(seq + 1)) % cfg.vocab_size).to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        loss_single = F.cross_entropy(single(inputs).flatten(0, 1), targets.flatten())
        loss_tp = dtp.vocab_parallel_cross_entropy(tp(inputs), targets)  # logits stay sharded over the vocab
        for loss, opt in ((loss_single, opt_single), (loss_tp, opt_tp)):
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append((step, loss_tp.item(), loss_single.item()))
    return rows


def job(steps: int, sequence_parallel: bool) -> tuple:
    """One rank's part: the rows, with the world size and backend for the printout."""
    return train(steps, sequence_parallel), dist.get_world_size(), dist.get_backend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_launch_arguments(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    # python: starts the ranks here; torchrun: this process is one rank (bounded collectives, exit on failure)
    result = launch(job, args.steps, args.sequence_parallel, world_size=script_world_size(args.world_size),
                    backend=args.backend)
    if result is None:  # a torchrun rank other than 0: rank 0 prints
        return
    rows, world, backend = result
    sp = " +sp" if args.sequence_parallel else ""
    for step, tp_loss, single_loss in rows:
        print(f"step {step:2d}   tp={world}{sp} loss {tp_loss:.5f}   single-process loss {single_loss:.5f}   "
              f"|diff| {abs(tp_loss - single_loss):.1e}")
    worst = max(abs(a - b) for _, a, b in rows)
    print(f"loss {rows[0][1]:.3f} -> {rows[-1][1]:.3f}; max |tp - single-process| over {len(rows)} steps on "
          f"{world} ranks ({backend}): {worst:.2e}")


if __name__ == "__main__":
    main()
