"""dtp.testing.RankPool: real ranks, reused, failures reported with the rank's traceback, no hangs."""

import time

import pytest
import torch
import torch.distributed as dist

from dtp.testing import RankError, RankPool


def case_sum_of_ranks():
    t = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(t)
    return t.item(), torch.get_num_threads()


def case_rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("rank one is unhappy")
    dist.all_reduce(torch.ones(1))  # the others wait here for a rank that never comes


def case_sleep(seconds):
    time.sleep(seconds)


def test_results_by_rank_one_thread_each(pools):
    assert pools.run(3, case_sum_of_ranks) == [(3.0, 1)] * 3


def test_reused_workers_are_fast(pools):
    pools.run(2, case_sum_of_ranks)  # warm
    start = time.perf_counter()
    for _ in range(5):
        pools.run(2, case_sum_of_ranks)
    assert (time.perf_counter() - start) / 5 < 1.0


def test_failing_rank_reported_and_nobody_hangs():
    with RankPool(3, timeout=30) as pool:
        start = time.perf_counter()
        with pytest.raises(RankError) as info:
            pool.run(case_rank_one_raises)
        assert time.perf_counter() - start < 20, "the waiting ranks were not released"
        assert "rank 1 raised" in str(info.value) and "rank one is unhappy" in str(info.value)
        # the pool restarts itself and works again
        assert [r[0] for r in pool.run(case_sum_of_ranks)] == [3.0] * 3


def test_timeout_is_enforced():
    with RankPool(1, timeout=30) as pool:
        pool.run(case_sum_of_ranks)
        with pytest.raises(RankError, match="gave no answer"):
            pool.run(case_sleep, 60, timeout=2)
