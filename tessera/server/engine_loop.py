"""The HTTP process's handle on the engine process (`engine_worker.py`).

`AsyncEngine.start` spawns the engine process and waits until its model is loaded and its graphs are
captured. Handlers `submit` requests and `abort` them; a writer thread sends to the engine, so a full
pipe never stalls the event loop, and a reader thread hands everything that has arrived to the event
loop in one callback. Each request's tokens accumulate on its `Handle`; `Handle.next()` wakes once for
any number of new tokens, so a stream that falls behind sends one chunk with all of them instead of
falling further behind, while the engine steps on regardless.

When the engine process dies (the reader sees the end of its pipe), every request in it fails, the
running/waiting gauges drop to 0, the process is reaped, and the `on_death` callbacks run (`tessera
serve` stops the server then, and exits 1 so that a supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tessera.engine.config import EngineConfig
from tessera.engine.detokenize import IncrementalDetokenizer
from tessera.engine.sampling import SamplingParams, TopLogprobs
from tessera.loader.tokenizer import Tokenizer
from tessera.server import engine_worker

logger = logging.getLogger("tessera")
REAP_TIMEOUT_S = 30.0  # a dead engine's pipe closed; give its process this long to exit before killing it


@dataclass
class Update:
    """A request's state: full text so far, why it ended (or None); its tokens and their logprobs on
    the final update only (streaming needs the text until then)."""

    text: str
    token_ids: list[int]  # final update: all of them; before: empty
    logprobs: list[float]
    finish_reason: str | None  # "stop", "length", or "error" if the engine failed
    error: str | None = None  # why the request failed (finish_reason "error")
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    new_token_ids: list[int] = field(default_factory=list)  # since the previous update (streamed logprobs)
    new_logprobs: list[float] = field(default_factory=list)
    # each token's most likely alternatives, where the request asked for top_logprobs (else empty)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    new_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    spec: tuple[int, int] = (0, 0)  # speculative decoding: verifies run, draft tokens accepted


class Handle:
    """One request in the engine; `next()` waits for news and returns the request's state."""

    def __init__(self, rid: int, params: SamplingParams, tokenizer: Tokenizer, eos: tuple[int, ...]) -> None:
        self.rid, self.params = rid, params
        self._detok = IncrementalDetokenizer(tokenizer, params, eos)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[TopLogprobs] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.cached_tokens = 0
        self.spec = (0, 0)
        self._reported = 0  # tokens handed out by earlier updates
        self._changed = asyncio.Event()

    async def next(self) -> Update:
        await self._changed.wait()
        self._changed.clear()
        done = self.finish_reason is not None
        text = self._detok.text(self.token_ids, final=done)
        # NOTE: no copy of the token lists on every update (it made a long stream quadratic); a finished
        # handle is never advanced again, so the final update can hand over its own lists
        ids, logprobs, tops = (self.token_ids, self.logprobs, self.top_logprobs) if done else ([], [], [])
        new = slice(self._reported, len(self.logprobs))
        self._reported = new.stop
        return Update(text, ids, logprobs, self.finish_reason, self.error, self.cached_tokens,
                      self.token_ids[new], self.logprobs[new], tops, self.top_logprobs[new],
                      self.spec)  # fmt: skip

    def _advance(
        self,
        tokens: list[int],
        logprobs: list[float],
        tops: list[TopLogprobs],
        finish_reason: str | None,
        cached: int,
        spec: tuple[int, int],
    ) -> None:
        self.token_ids += tokens
        self.logprobs += logprobs
        self.top_logprobs += tops
        self.finish_reason, self.cached_tokens, self.spec = finish_reason, cached, spec
        self._changed.set()

    def _fail(self, error: str) -> None:
        self.finish_reason, self.error = "error", error
        self._changed.set()


class AsyncEngine:
    def __init__(self, proc: Any, inbox: Connection, outbox: Connection, info: dict[str, Any]) -> None:
        self._proc, self._inbox, self._outbox = proc, inbox, outbox
        self.tokenizer: Tokenizer = info["tokenizer"]
        self.eos_token_ids: tuple[int, ...] = info["eos_token_ids"]
        self.max_model_len: int | None = info.get("max_model_len")  # None: a stand-in engine without one
        self.stats: dict[str, Any] = info["stats"]  # the engine's gauges, refreshed while it runs
        self.alive = True
        self.died = False  # the process ended on its own (not by `shutdown`)
        self._stopped = False
        self._lock = threading.Lock()  # `died` and its callbacks
        self._reaping = threading.Lock()
        self._on_death: list[Callable[[], None]] = []
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = {"finished": 0, "aborted": 0, "failed": 0}
        self._ids = itertools.count()
        self._handles: dict[int, Handle] = {}
        self._admissions: dict[int, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sendq: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="tessera-engine-writer", daemon=True)
        self._reader = threading.Thread(target=self._read, name="tessera-engine-reader", daemon=True)
        self._writer.start()
        self._reader.start()

    @classmethod
    def start(cls, config: EngineConfig) -> AsyncEngine:
        """Spawn the engine process with `Engine(config)`; returns once it is ready."""
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA state
        in_recv, in_send = ctx.Pipe(duplex=False)
        out_recv, out_send = ctx.Pipe(duplex=False)
        level = logging.getLogger("tessera").getEffectiveLevel()
        proc = ctx.Process(
            target=engine_worker.main,
            args=(config, level, in_recv, out_send),
            name="tessera-engine",
            daemon=True,
        )
        proc.start()
        in_recv.close()
        out_send.close()
        while not out_recv.poll(1.0):  # loading and capturing; fail fast if the process died
            if not proc.is_alive():
                raise RuntimeError(f"the engine process exited with code {proc.exitcode} while starting")
        try:
            msg = out_recv.recv()
        except EOFError:  # it exited between the poll and the read
            proc.join(timeout=10)
            msg = ("init_failed", f"it exited with code {proc.exitcode}")
        if msg[0] != "ready":
            proc.join(timeout=10)
            raise RuntimeError(f"the engine process failed to start:\n{msg[1]}")
        return cls(proc, in_send, out_recv, msg[1])

    # -- the HTTP side's calls (event loop) ---------------------------------------------------------

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        """Queue a request; raises ValueError (the engine's checks) if it can never run."""
        if not self.alive:
            raise RuntimeError("the engine process is not running")
        self._loop = asyncio.get_running_loop()
        rid = next(self._ids)
        handle = Handle(rid, params, self.tokenizer, self.eos_token_ids)
        admitted = self._loop.create_future()
        self._handles[rid], self._admissions[rid] = handle, admitted
        self._sendq.put(("add", rid, prompt_ids, params))
        if not self.alive:  # NOTE: it died just now, maybe before the reader knew of this loop to say so
            self._engine_gone("the engine process exited")
        try:
            await admitted
        except ValueError:
            self._handles.pop(rid, None)
            raise
        except asyncio.CancelledError:  # the client left while the request was being admitted
            self.abort(handle)
            raise
        self.prompt_tokens += len(prompt_ids)
        return handle

    def abort(self, handle: Handle) -> None:
        """Stop a request (its pages go back to the pool); a finished one is left as it is."""
        if self._handles.pop(handle.rid, None) is not None:
            self._sendq.put(("abort", handle.rid))
            self.requests["aborted"] += 1

    def fail_next_step(self, message: str) -> None:
        """Fault injection: the engine's next step raises RuntimeError(message) (recovery tests)."""
        self._sendq.put(("fail_next_step", message))

    def on_death(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the engine process has died on its own and been reaped, from the reader
        thread (at once if it already has); its requests' failures are queued on the event loop by then."""
        with self._lock:
            if not self.died:
                self._on_death.append(callback)
                return
        callback()

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the engine process (once: the app's lifespan and `tessera serve` both call it)."""
        if self._stopped:
            return
        self._stopped = True
        self._sendq.put(("stop",))
        self._sendq.put(None)
        self._reap(timeout)

    @property
    def exit_code(self) -> int | None:
        """The engine process's exit code once it has been reaped (negative: killed by that signal)."""
        return self._proc.exitcode

    @property
    def num_running(self) -> int:
        return self.stats["num_running"]

    @property
    def num_waiting(self) -> int:
        return self.stats["num_waiting"]

    # -- threads and the event-loop callback -----------------------------------------------------

    def _write(self) -> None:
        while (msg := self._sendq.get()) is not None:
            try:
                self._inbox.send(msg)
            except (BrokenPipeError, OSError):
                return

    def _read(self) -> None:
        try:
            while True:
                batch = [self._outbox.recv()]
                while self._outbox.poll(0):  # everything that has arrived goes in one callback
                    batch.append(self._outbox.recv())
                for msg in batch:
                    if msg[0] == "step" and msg[2] is not None:
                        self.stats = msg[2]
                self._call(self._dispatch, batch)
        except (EOFError, OSError):
            self.alive = False
            if self._stopped:  # `shutdown` reaps it
                self._call(self._engine_gone, "the server is shutting down")
                return
            self._died()

    def _died(self) -> None:
        # NOTE: gauges first: the engine reports no more, and its last report would stand forever
        self.stats = {**self.stats, "num_running": 0, "num_waiting": 0, "has_work": False}
        self._call(self._engine_gone, "the engine process exited")
        self._reap(REAP_TIMEOUT_S)  # no <defunct> process left behind
        logger.error("the engine process exited unexpectedly (exit code %s)", self.exit_code)
        with self._lock:
            self.died = True
            callbacks = list(self._on_death)
        for callback in callbacks:
            callback()

    def _reap(self, timeout: float) -> None:
        # NOTE: one joiner at a time: two threads' waitpid on one child can leave one without its code
        with self._reaping:
            self._proc.join(timeout=timeout)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)

    def _call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _dispatch(self, batch: list[tuple[Any, ...]]) -> None:
        for msg in batch:
            kind = msg[0]
            if kind == "step":
                for rid, tokens, logprobs, tops, finish_reason, cached, spec in msg[1]:
                    self.generation_tokens += len(tokens)
                    handle = self._handles.get(rid)
                    if handle is None:  # aborted here before the engine heard of it
                        continue
                    handle._advance(tokens, logprobs, tops, finish_reason, cached, spec)
                    if finish_reason is not None:
                        del self._handles[rid]
                        self.requests["finished"] += 1
            elif kind == "admitted":
                for rid in msg[1]:
                    _settle(self._admissions.pop(rid, None), None)
                for rid, reason in msg[2]:
                    _settle(self._admissions.pop(rid, None), ValueError(reason))
            elif kind == "failed":
                logger.error("engine step failed (%s); %d requests failed", msg[2], len(msg[1]))
                for rid in msg[1]:
                    handle = self._handles.pop(rid, None)
                    if handle is not None:
                        handle._fail("the engine failed on this batch (see the server log)")
                        self.requests["failed"] += 1

    def _engine_gone(self, reason: str) -> None:
        if self._handles:  # NOTE: a warning: the death itself is logged as the error, with its exit code
            logger.warning("%s; failing %d requests", reason, len(self._handles))
        for handle in self._handles.values():
            handle._fail(reason)
        self.requests["failed"] += len(self._handles)
        self._handles.clear()
        for future in self._admissions.values():
            _settle(future, RuntimeError(reason))
        self._admissions.clear()


def _settle(future: asyncio.Future[None] | None, error: BaseException | None) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(None)
