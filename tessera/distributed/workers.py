"""Ranks 1..N-1 as long-lived worker processes beside the caller, which is rank 0.

`Workers.start(fn, world_size, *args)` spawns one daemon process per extra rank, each running
`fn(rank, world_size, *args)` after `init_distributed`, then joins the group as rank 0 itself. Unlike
`launch`, rank 0 is the caller and the workers keep running until `fn` returns (the engine's worker loop
returns on a stop message). `check()` raises a `WorkerError` naming a rank that died or raised, at once;
`failure(exc)` turns an error of a collective into that `WorkerError` when a worker is to blame.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tessera.distributed.launch import WorkerError, _free_port, _outcome, _stop
from tessera.distributed.state import destroy, init_distributed

PARENT_POLL_S = 0.5  # how often a worker looks whether rank 0's process still lives
SPAWN_TIMEOUT_S = 120.0  # a spawned worker's start (imports) before it joins the group


class Workers:
    def __init__(self, procs: list[Any], readers: list[Connection]) -> None:
        self.procs, self.readers = procs, readers  # rank r is procs[r - 1]
        self._outcomes: dict[int, tuple[str, Any, float]] = {}  # by rank: a pipe is read once

    @classmethod
    def start(
        cls,
        fn: Callable[..., Any],
        world_size: int,
        *args: Any,
        backend: str,
        ep: int = 1,
        timeout_s: float = 60.0,
    ) -> Workers:
        """Spawn ranks 1..world_size-1 and join their process group as rank 0 (`fn` and `args` must pickle:
        `fn` lives at a module's top level). A worker that dies before the group forms is named."""
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        workers = cls([], [])
        with _children_allowed():
            for rank in range(1, world_size):
                reader, writer = ctx.Pipe(duplex=False)
                worker_args = (
                    fn,
                    rank,
                    world_size,
                    init_method,
                    backend,
                    ep,
                    timeout_s,
                    os.getpid(),
                    args,
                    writer,
                )
                proc = ctx.Process(target=_serve, args=worker_args, name=f"tessera-rank-{rank}", daemon=True)
                proc.start()
                writer.close()  # NOTE: the child holds the only write end: its death reads as EOF here
                workers.procs.append(proc)
                workers.readers.append(reader)
        try:
            # NOTE: rank 0 joins once every worker is up: a worker dead before joining would leave it
            # waiting in init_process_group until the timeout, without a word on which rank failed
            workers._wait_up(SPAWN_TIMEOUT_S)
            init_distributed(0, world_size, backend, init_method, ep=ep, timeout_s=timeout_s, local_rank=0)
        except BaseException as exc:
            error = workers.failure(exc)
            workers.stop(timeout_s=0)
            if error is exc:
                raise
            raise error from exc
        return workers

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    def check(self) -> None:
        """Raise `WorkerError` if a worker has died (a raising worker exits at once too)."""
        # NOTE: one waitpid(WNOHANG) a worker: a select() over pipes and sentinels cost ~10x that
        if not all(proc.is_alive() for proc in self.procs) or self._outcomes:
            failed = self._failed()
            if failed:
                raise WorkerError(failed)

    def failure(self, exc: BaseException, grace_s: float = 1.0) -> BaseException:
        """What to raise for `exc`, an error on rank 0 while the workers ran: a `WorkerError` naming the
        ranks that died or raised (waiting up to `grace_s` for a death that caused `exc` to show), else
        `exc` itself."""
        deadline = time.monotonic() + grace_s
        while True:
            failed = self._failed()
            alive = [proc.sentinel for proc in self.procs if proc.is_alive()]
            left = deadline - time.monotonic()
            if failed or not alive or left <= 0:
                return WorkerError(failed) if failed else exc
            wait(alive, timeout=left)

    def wait(self, work: dist.Work, what: str, timeout_s: float) -> None:
        """Wait for an asynchronous collective rank 0 started, checking the workers meanwhile (start-up
        waits: loading and capturing take long, but a dead worker is named at once)."""
        deadline = time.monotonic() + timeout_s
        while not work.is_completed():
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: the workers did not answer within {timeout_s:.0f}s")
            time.sleep(0.01)
        try:
            work.wait()
        except Exception as exc:
            raise self.failure(exc) from exc

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the workers to exit (after their `fn` returned), then end those that have not."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(timeout=max(deadline - time.monotonic(), 0.0))
        _stop(self.procs)
        for reader in self.readers:
            reader.close()
        self.procs, self.readers = [], []

    def _wait_up(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for rank, (proc, reader) in enumerate(zip(self.procs, self.readers, strict=True), start=1):
            wait([reader, proc.sentinel], timeout=max(deadline - time.monotonic(), 0.0))
            with contextlib.suppress(EOFError):
                if reader.poll() and pickle.loads(reader.recv_bytes())[0] == "up":
                    continue
            failed = self._failed()
            raise (
                WorkerError(failed)
                if failed
                else TimeoutError(f"rank {rank} did not start in {timeout_s:.0f}s")
            )

    def _failed(self) -> list[tuple[int, str]]:
        for rank, (proc, reader) in enumerate(zip(self.procs, self.readers, strict=True), start=1):
            # NOTE: a loop: a rank whose start-up message was not read yet has it first in its pipe
            while rank not in self._outcomes and (reader.poll() or not proc.is_alive()):
                outcome = _outcome(proc, reader)
                if outcome is None:
                    break
                if outcome[0] != "up":  # its start-up message, which says nothing of how it ended
                    self._outcomes[rank] = outcome
        return [(rank, what) for rank, (status, what, _) in sorted(self._outcomes.items()) if status != "ok"]


def _serve(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_method: str,
    backend: str,
    ep: int,
    timeout_s: float,
    parent: int,
    args: tuple[Any, ...],
    conn: Connection,
) -> None:
    threading.Thread(target=_exit_with, args=(parent,), name="tessera-parent-watch", daemon=True).start()
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))  # the ranks share the cores
    conn.send_bytes(pickle.dumps(("up", None, time.time())))
    try:
        init_distributed(rank, world_size, backend, init_method, ep=ep, timeout_s=timeout_s, local_rank=rank)
        fn(rank, world_size, *args)
        outcome: tuple[str, Any, float] = ("ok", None, time.time())
    except BaseException:
        outcome = ("raised", traceback.format_exc(), time.time())
    with contextlib.suppress(OSError):
        conn.send_bytes(pickle.dumps(outcome))
    conn.close()
    destroy()
    if outcome[0] != "ok":
        os._exit(1)


def _exit_with(parent: int) -> None:
    """A worker outlives no rank 0: killed (SIGKILL, or SIGTERM of a daemonic server engine) it runs no
    clean-up, and a worker blocked waiting for its next step would wait for ever."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


@contextlib.contextmanager
def _children_allowed() -> Iterator[None]:
    # NOTE: the server's engine process is daemonic (it dies with the HTTP process), and multiprocessing
    # refuses daemons children lest they be orphaned; these workers exit when their parent goes
    config = mp.current_process()._config  # type: ignore[attr-defined]
    daemon = config.pop("daemon", None)
    try:
        yield
    finally:
        if daemon is not None:
            config["daemon"] = daemon
