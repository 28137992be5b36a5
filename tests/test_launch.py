"""The rank pool: results in rank order, errors carried back, hangs killed instead of waited on."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sp_kernels.testing.launch import RankError, RankPool


def _rank_and_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _hang_on_rank_0():
    if dist.get_rank() == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins
    return dist.get_rank()


def _fail_on_rank_1():
    if dist.get_rank() == 1:
        raise ValueError("rank one says no")
    return dist.get_rank()


def test_results_errors_and_hangs():
    pool = RankPool(2, timeout=60.0)
    try:
        assert pool.run(_rank_and_sum) == [(0, 3.0), (1, 3.0)]
        with pytest.raises(RankError, match="rank 1: ValueError: rank one says no") as info:
            pool.run(_fail_on_rank_1)
        assert info.value.types() == {"ValueError"} and list(info.value.errors) == [1]
        assert pool.run(_rank_and_sum) == [(0, 3.0), (1, 3.0)]  # still usable after an error
        with pytest.raises(TimeoutError, match="rank 0 of 2 did not finish _hang_on_rank_0 within 3s"):
            pool.run(_hang_on_rank_0, timeout=3.0)
        assert not pool.alive
        with pytest.raises(RuntimeError, match="closed or broken"):
            pool.run(_rank_and_sum)
    finally:
        pool.close()


def test_bad_world_size():
    with pytest.raises(ValueError, match="world_size >= 1, got 0"):
        RankPool(0)
