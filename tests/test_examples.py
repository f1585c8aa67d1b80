"""The examples train tensor-parallel models whose loss tracks the single-process loss step by step."""

import pytest

from examples.checkpoint_reshard import first_run, resumed_run
from examples.train_gpt import train as train_gpt
from examples.train_mlp import train as train_mlp


@pytest.mark.parametrize("world", [2, 4])
def test_mlp_example(pools, world):
    rows = pools.run(world, train_mlp, 5)[0]
    assert all(abs(tp - single) < 1e-5 for _, tp, single in rows), rows


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_gpt_example(pools, sp):
    rows = pools.run(2, train_gpt, 8, sp)[0]
    assert all(abs(tp - single) < 1e-4 for _, tp, single in rows), rows
    assert rows[-1][1] < rows[0][1], "the loss goes down"


@pytest.mark.parametrize("reload_world, reload_tp", [(4, None), (1, None), (4, 2), (2, 1)],
                         ids=["tp4", "tp1", "4-ranks-as-2-replicas-of-tp2", "2-ranks-as-2-replicas-of-tp1"])
def test_checkpoint_reshard_example_continues_with_the_same_loss(pools, tmp_path, reload_world, reload_tp):
    """dp=2 x tp=2 saved; reloaded on new ranks, or (as under torchrun) on sub-meshes: replicas of a smaller tp."""
    path = str(tmp_path / "ckpt")
    straight = pools.run(4, first_run, path, 3, 6)[0]
    resumed = pools.run(reload_world, resumed_run, path, 3, 6, reload_tp)[0]
    assert len(resumed) == 3
    for a, b in zip(straight[3:], resumed):
        assert abs(a - b) < 1e-5, (straight, resumed)
