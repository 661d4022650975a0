"""Run a function on N ranks, one spawned process each, and bring their results back.

`launch(fn, world_size, *args)` starts the ranks on a free local port, runs `fn(rank, world_size,
*args)` in each after `init_distributed`, and returns the ranks' results in rank order. A rank that
raises or dies (a signal, an exit) turns into a `WorkerError` naming it, at once rather than when the
others' collectives time out; ranks still running are then terminated. Used by tests (gloo on CPU) and
by single-node multi-GPU runs.
"""

from __future__ import annotations

import pickle
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
import torch.multiprocessing as mp

from tessera.distributed.state import destroy, init_distributed

# after a first failure, how long to wait for the others' (a dead rank's peers fail in their collectives:
# reporting them together names the rank that started it)
_GRACE_S = 0.5


class WorkerError(RuntimeError):
    """One or more ranks failed; `rank` is the first to blame (a rank that died before one that raised)."""

    def __init__(self, failures: list[tuple[int, str]]) -> None:
        self.ranks = [rank for rank, _ in failures]
        self.rank = self.ranks[0]
        super().__init__("\n".join(f"rank {rank} {what}" for rank, what in failures))


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 300.0,
    collective_timeout_s: float = 60.0,
) -> list[Any]:
    """`[fn(rank, world_size, *args) for rank in range(world_size)]`, each rank in its own process (spawn:
    `fn` and `args` must pickle, so `fn` lives at a module's top level). Raises `WorkerError` when a rank
    fails and `TimeoutError` when some are still running after `timeout_s`."""
    ctx = mp.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs: list[Any] = []
    readers: list[Connection] = []
    try:
        for rank in range(world_size):
            reader, writer = ctx.Pipe(duplex=False)
            worker_args = (fn, rank, world_size, init_method, backend, collective_timeout_s, args, writer)
            proc = ctx.Process(target=_worker, args=worker_args, name=f"tessera-rank-{rank}", daemon=True)
            proc.start()
            writer.close()  # NOTE: the child holds the only write end, so its death reads as EOF here
            procs.append(proc)
            readers.append(reader)
        return _collect(procs, readers, timeout_s)
    finally:
        _stop(procs)
        for reader in readers:
            reader.close()


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    init_method: str,
    backend: str | None,
    collective_timeout_s: float,
    args: tuple[Any, ...],
    conn: Connection,
) -> None:
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        init_distributed(rank, world_size, backend, init_method, timeout_s=collective_timeout_s)
        outcome: tuple[str, Any, float] = ("ok", fn(rank, world_size, *args), time.time())
    except BaseException:
        outcome = ("raised", traceback.format_exc(), time.time())
    try:
        # NOTE: plain pickle copies tensors into the message; torch's pickler would share their memory,
        # which the parent could only read while this process still lives
        conn.send_bytes(pickle.dumps(outcome))
    except Exception:
        what = f"returned a result that cannot be sent back:\n{traceback.format_exc()}"
        outcome = ("raised", what, time.time())
        conn.send_bytes(pickle.dumps(outcome))
    finally:
        conn.close()
        destroy()
    if outcome[0] != "ok":
        sys.exit(1)


def _collect(procs: list[Any], readers: list[Connection], timeout_s: float) -> list[Any]:
    results: dict[int, Any] = {}
    # (raised, when, rank, what): deaths first, then the earliest exception (its peers' collectives
    # failed because of it)
    failures: list[tuple[bool, float, int, str]] = []
    pending = set(range(len(procs)))
    deadline = time.monotonic() + timeout_s
    end = deadline
    while pending and time.monotonic() < end:
        wait([readers[r] for r in pending] + [procs[r].sentinel for r in pending], end - time.monotonic())
        for rank in sorted(pending):
            outcome = _outcome(procs[rank], readers[rank])
            if outcome is None:
                continue
            pending.discard(rank)
            status, value, when = outcome
            if status == "ok":
                results[rank] = value
            else:
                failures.append((status == "raised", when, rank, value))
                end = min(end, time.monotonic() + _GRACE_S)
    if failures:
        raise WorkerError([(rank, what) for _, _, rank, what in sorted(failures)])
    if pending:
        raise TimeoutError(f"ranks {sorted(pending)} still running after {timeout_s:.0f}s")
    return [results[rank] for rank in range(len(procs))]


def _outcome(proc: Any, reader: Connection) -> tuple[str, Any, float] | None:
    """(status, what, when): ("ok", result, ...), ("raised", traceback, ...), ("died", how, ...), or None
    while the rank is still running."""
    if reader.poll():
        try:
            status, value, when = pickle.loads(reader.recv_bytes())
        except EOFError:  # exited without a word
            return "died", _death(proc), time.time()
        return status, f"raised:\n{value}" if status == "raised" else value, when
    if proc.is_alive() or reader.poll():
        return None  # still running, or wrote its result just before exiting: read on the next round
    return "died", _death(proc), time.time()


def _death(proc: Any) -> str:
    proc.join(timeout=1.0)
    code = proc.exitcode
    if code is not None and code < 0:
        return f"died: killed by {signal.Signals(-code).name}"
    return f"died: exit code {code}"


def _stop(procs: list[Any]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=2.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
