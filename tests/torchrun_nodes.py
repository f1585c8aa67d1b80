"""Run under torchrun by tests/test_launch.py: "mesh" checks a (dp, tp) mesh across torchrun nodes; "hang" waits forever.

mesh: dtp.init_mesh(dp=nodes, tp=ranks per node) keeps each tp group inside one node (torchrun's GROUP_RANK), and one
TP x DDP step over it gives one process's gradients.  hang: each rank prints its pid and waits (rank 0 sleeps, the
others wait in a barrier for it), so the test can kill torchrun's agent and see that no rank outlives it.
"""

import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import dtp  # noqa: E402
from dtp.launch import run_under_torchrun  # noqa: E402


def mesh_job() -> tuple:
    """The mesh's tp groups, the nodes of their ranks, and one TP x DDP step's largest gradient error."""
    torch.set_num_threads(1)
    world, per_node = dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])
    mesh = dtp.init_mesh(dp=world // per_node, tp=per_node)
    node_of = [None] * world
    dist.all_gather_object(node_of, int(os.environ["GROUP_RANK"]))
    groups = mesh.mesh.tolist()  # row i: the ranks of dp replica i's tp group
    nodes = [[node_of[r] for r in row] for row in groups]
    if any(len(set(row)) != 1 for row in nodes):
        raise AssertionError(f"a tp group spans nodes: tp groups {groups} on nodes {nodes}")
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    model = copy.deepcopy(single)
    dtp.parallelize_2d(model, mesh, {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()}, data_parallel="ddp")
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    x, y = torch.randn(4 * dp, 8), torch.randn(4 * dp, 8)
    nn.functional.mse_loss(model(x.chunk(dp)[dp_rank]), y.chunk(dp)[dp_rank]).backward()
    nn.functional.mse_loss(single(x), y).backward()
    expected = dict(single.named_parameters())
    worst = max((p.grad.full_tensor() - expected[name].grad).abs().max().item()
                for name, p in model.named_parameters())
    return groups, nodes, worst, dist.get_backend()


def hang_job() -> None:
    """Print this rank's pid, then wait: rank 0 sleeps, the others in a collective that never completes."""
    print(f"rank {dist.get_rank()} pid {os.getpid()}", flush=True)
    if dist.get_rank() == 0:
        time.sleep(3600)
    dist.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "hang":
        run_under_torchrun(hang_job, timeout_s=3600)
    else:
        result = run_under_torchrun(mesh_job)
        if int(os.environ["RANK"]) == 0:
            groups, nodes, worst, backend = result
            print(f"mesh (dp={len(groups)}, tp={len(groups[0])}) on {backend}: tp groups {groups} on nodes {nodes}; "
                  f"max gradient error vs one process {worst:.1e}")
