"""Shared fixtures: one pool of gloo ranks per world size for the whole session."""

from __future__ import annotations

import pytest

from sp_kernels.testing.launch import RankPool


class _Pools:
    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def __call__(self, world_size: int) -> RankPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            pool = self._pools[world_size] = RankPool(world_size, timeout=180.0)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


@pytest.fixture(scope="session")
def rank_pool():
    """``rank_pool(n)`` -> a RankPool of n gloo ranks, shared by every test of the session."""
    pools = _Pools()
    yield pools
    pools.close()


@pytest.fixture(scope="session")
def rank_batch(rank_pool):
    """``rank_batch(fn, world_size, cases)`` -> every rank's results of ``fn(cases)``, computed once per
    (fn, world size) in the session. Tests parametrized per case share that one pool call (spawning and
    synchronising ranks costs seconds) and still pass, fail and are named one case at a time. A batch
    that fails as a whole (a rank died, the pool timed out) fails every case that reads it."""
    results: dict[tuple, object] = {}

    def get(fn, world_size: int, cases: list):
        key = (fn.__module__, fn.__qualname__, world_size, len(cases))
        if key not in results:
            try:
                results[key] = rank_pool(world_size).run(fn, cases)
            except Exception as e:  # noqa: BLE001 - re-raised for every case of the batch
                results[key] = e
        got = results[key]
        if isinstance(got, Exception):
            raise RuntimeError(f"the batch of {len(cases)} cases on {world_size} ranks failed") from got
        return got

    return get


@pytest.fixture(autouse=True)
def _deadline():
    """A per-test deadline, so the suite itself never hangs: a test still running after
    SP_KERNELS_TEST_DEADLINE seconds (default 900) fails with a TimeoutError raised in the main thread
    (collectives run in the rank processes; the pool's own per-call deadline kills those)."""
    import os
    import signal

    seconds = int(os.environ.get("SP_KERNELS_TEST_DEADLINE", "900"))
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"test exceeded its {seconds}s deadline (SP_KERNELS_TEST_DEADLINE)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
