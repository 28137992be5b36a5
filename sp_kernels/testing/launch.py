"""A reusable pool of torch.distributed ranks in local processes.

Spawning ranks costs seconds (each imports torch), so tests and the demo start one pool per world
size and run many functions on it. Every call has a deadline: a rank that hangs in a collective
kills the pool instead of the caller, and a rank that raises brings its traceback back.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


class RankError(RuntimeError):
    """One or more ranks raised; ``errors`` maps rank -> (exception type name, message, traceback)."""

    def __init__(self, errors: dict[int, tuple[str, str, str]]):
        self.errors = errors
        parts = [f"rank {r}: {name}: {msg}\n{tb}" for r, (name, msg, tb) in sorted(errors.items())]
        super().__init__("\n".join(parts))

    def types(self) -> set[str]:
        return {name for name, _, _ in self.errors.values()}

    def messages(self) -> list[str]:
        return [msg for _, msg, _ in self.errors.values()]


def _worker(rank: int, world_size: int, init_method: str, backend: str | None, timeout_s: float, conn, threads: int):
    os.environ["SP_KERNELS_RANK"] = str(rank)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            fn, args, kwargs = msg
            try:
                result = ("ok", fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
                result = ("err", (type(e).__name__, str(e), traceback.format_exc()))
            try:
                conn.send(result)
            except Exception as e:  # an unpicklable result
                conn.send(("err", (type(e).__name__, f"result of rank {rank} could not be sent: {e}", "")))
    finally:
        from sp_kernels.distributed.parallel_state import destroy_sequence_parallel

        try:
            destroy_sequence_parallel()
        finally:
            dist.destroy_process_group()


def _check_deadline(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {value!r}")


class RankPool:
    """``world_size`` processes joined in one default process group, reused across calls."""

    def __init__(
        self,
        world_size: int,
        backend: str | None = "gloo",
        timeout: float = 120.0,
        threads_per_rank: int = 1,
    ) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"RankPool needs world_size >= 1, got {world_size}")
        _check_deadline("RankPool timeout", timeout)
        self.world_size = world_size
        self.backend = backend
        self.timeout = timeout
        self._dir = tempfile.TemporaryDirectory(prefix="sp_kernels_pool_")
        init_method = "file://" + os.path.join(self._dir.name, "store")
        ctx = mp.get_context("spawn")
        self._conns = []
        self._procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, init_method, backend, timeout, child, threads_per_rank),
                daemon=True,
            )
            p.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(p)
        self.alive = True

    def run(self, fn: Callable, *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results in rank order.

        ``fn`` must be importable by name (a module-level function). ``timeout`` (seconds, default:
        the pool's) bounds this call: past it the pool is killed and TimeoutError raised, so a test
        that makes one rank skip a collective on purpose passes a short one. A rank that raises
        leaves the pool usable: its error comes back in a RankError once every rank has answered.
        """
        if not self.alive:
            raise RuntimeError("this RankPool was closed or broken by an earlier timeout")
        if timeout is not None:
            _check_deadline("RankPool.run timeout", timeout)
        deadline = timeout if timeout is not None else self.timeout
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        results: list[Any] = [None] * self.world_size
        errors: dict[int, tuple[str, str, str]] = {}
        import time

        end = time.monotonic() + deadline
        for rank, conn in enumerate(self._conns):
            remaining = max(0.0, end - time.monotonic())
            if not conn.poll(remaining):
                self.close(force=True)
                raise TimeoutError(
                    f"rank {rank} of {self.world_size} did not finish {getattr(fn, '__name__', fn)} within "
                    f"{deadline:.0f}s (a hang in a collective?); the pool was killed"
                )
            try:
                status, value = conn.recv()
            except EOFError:
                self.close(force=True)
                raise RuntimeError(f"rank {rank} died while running {getattr(fn, '__name__', fn)}") from None
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            raise RankError(errors)
        return results

    def close(self, force: bool = False) -> None:
        if not self.alive and not force:
            return
        self.alive = False
        if not force:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for conn in self._conns:
            conn.close()
        self._dir.cleanup()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
