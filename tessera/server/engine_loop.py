"""The engine on its own thread, so HTTP handling never waits on a forward step.

Only the engine thread touches the engine. Handlers put submissions and aborts into an inbox; the
thread drains it between steps and sends each request's progress back to its asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from tessera.engine.engine import Engine
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence

logger = logging.getLogger("tessera")


@dataclass
class Update:
    """A request's state after a step: full text so far, tokens so far, why it ended (or None)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None


@dataclass
class Handle:
    seq: Sequence
    updates: asyncio.Queue[Update]


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[Sequence, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Update]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests = {"finished": 0, "aborted": 0}
        self._thread.start()

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> Handle:
        """Queue a request; raises ValueError (from the engine's checks) if it can never run."""
        loop = asyncio.get_running_loop()
        admitted: asyncio.Future[Handle] = loop.create_future()
        self._inbox.put(("add", (prompt_ids, params, loop, admitted)))
        return await admitted

    def abort(self, seq: Sequence) -> None:
        self._inbox.put(("abort", seq))

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain(block=not self.engine.has_work)
            if self.engine.has_work:
                try:
                    advanced = self.engine.step()
                except Exception:
                    logger.exception("engine step failed; failing its requests")
                    self._fail_all()
                    continue
                for seq in advanced:
                    self._publish(seq)

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            prompt_ids, params, loop, admitted = payload
            try:
                seq = self.engine.add(prompt_ids, params)
            except ValueError as exc:
                loop.call_soon_threadsafe(_settle, admitted, None, exc)
                return
            updates: asyncio.Queue[Update] = asyncio.Queue()
            self._streams[seq] = (loop, updates)
            self.prompt_tokens += len(prompt_ids)
            loop.call_soon_threadsafe(_settle, admitted, Handle(seq, updates), None)
        elif kind == "abort" and self._streams.pop(payload, None) is not None:
            self.engine.abort(payload)
            self.requests["aborted"] += 1

    def _publish(self, seq: Sequence) -> None:
        target = self._streams.get(seq)
        if target is None:
            return
        self.generation_tokens += 1
        update = Update(
            text=self.engine.text_so_far(seq),
            token_ids=list(seq.output_token_ids),
            logprobs=list(seq.output_logprobs),
            finish_reason=seq.finish_reason,
        )
        loop, updates = target
        loop.call_soon_threadsafe(updates.put_nowait, update)
        if seq.finished:
            del self._streams[seq]
            self.requests["finished"] += 1

    def _fail_all(self) -> None:
        for seq, (loop, updates) in list(self._streams.items()):
            self.engine.abort(seq)
            loop.call_soon_threadsafe(updates.put_nowait, Update("", [], [], "error"))
        self._streams.clear()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
