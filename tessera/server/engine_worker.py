"""The engine's own process: it owns the model, the KV cache and the scheduler, and does nothing but step.

The HTTP process talks to it over two pipes. In: `("add", rid, prompt_ids, params)`, `("abort", rid)`,
`("fail_next_step", message)` (fault injection, for recovery tests) and `("stop",)`. Out: `("ready",
info)` once the model is loaded and captured (or `("init_failed", traceback)`), then per step
`("step", outputs, stats)` with one `(rid, tokens, logprobs, top_logprobs, finish_reason,
cached_tokens, spec)` per request that advanced: its new tokens (one; with speculative decoding, the
accepted drafts and the target's own), each one's logprob and, where the request asked for them, its
most likely alternatives (else `[]`), and `spec` = (verifies, draft tokens accepted) so far. Also
`("admitted", rids, rejected)` after new requests were queued, and `("failed", rids, message)` when a
step raised (a tensor-parallel rank that died ends the process as well: `tessera serve` then exits).
Detokenization, stop-string cutting of the text, JSON and sockets all stay in the HTTP process: a
thread there would share the GIL with this loop, and at a few hundred streams the HTTP side's per-token
work was most of a decode step (tessera bench serve, H200).
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from tessera.engine.config import EngineConfig
from tessera.engine.engine import Engine
from tessera.engine.parallel import WorkerError
from tessera.engine.sequence import Sequence

logger = logging.getLogger("tessera")
STATS_INTERVAL_S = 0.2  # how often a busy engine reports its gauges (an idle one reports on going idle)


class _Worker:
    def __init__(self, engine: Engine, inbox: Connection, outbox: Connection) -> None:
        self.engine, self.inbox, self.outbox = engine, inbox, outbox
        self.seqs: dict[int, Sequence] = {}
        self.rids: dict[Sequence, int] = {}
        self.sent: dict[int, int] = {}  # output tokens sent, by request
        self.fail_next: str | None = None
        self.last_stats = 0.0

    def run(self) -> None:
        while True:
            # idle: sleep on the pipe; busy: only take what has already arrived
            if self.inbox.poll(None if not self.engine.has_work else 0):
                if not self._drain():
                    return
                if not self.engine.has_work:  # e.g. an abort freed pages while idle: say so
                    self._send_stats(outputs=[])
            if self.engine.has_work:
                self._step()

    def _drain(self) -> bool:
        admitted: list[int] = []
        rejected: list[tuple[int, str]] = []
        while self.inbox.poll(0):
            msg = self.inbox.recv()
            kind = msg[0]
            if kind == "add":
                _, rid, prompt_ids, params = msg
                try:
                    seq = self.engine.add(prompt_ids, params)
                except ValueError as exc:
                    rejected.append((rid, str(exc)))
                    continue
                admitted.append(rid)
                self.seqs[rid], self.rids[seq], self.sent[rid] = seq, rid, 0
            elif kind == "abort":
                seq = self.seqs.pop(msg[1], None)
                if seq is not None:
                    del self.rids[seq], self.sent[msg[1]]
                    self.engine.abort(seq)
            elif kind == "fail_next_step":
                self.fail_next = msg[1]
            elif kind == "stop":
                return False
        if admitted or rejected:
            self.outbox.send(("admitted", admitted, rejected))
        return True

    def _step(self) -> None:
        try:
            if self.fail_next is not None:
                message, self.fail_next = self.fail_next, None
                raise RuntimeError(message)
            advanced = self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing its requests")
            for seq in self.seqs.values():
                self.engine.abort(seq)
            self.outbox.send(("failed", list(self.seqs), f"{type(exc).__name__}: {exc}"))
            self.seqs.clear()
            self.rids.clear()
            self.sent.clear()
            if isinstance(exc, WorkerError):  # a TP rank is gone: this engine can run no step again
                raise
            return
        outputs = []
        for seq in advanced:
            rid = self.rids.get(seq)
            if rid is None:
                continue
            new = slice(self.sent[rid], len(seq.output_token_ids))
            self.sent[rid] = new.stop
            outputs.append(
                (rid, seq.output_token_ids[new], seq.output_logprobs[new], seq.output_top_logprobs[new],
                 seq.finish_reason, seq.cached_prompt_tokens or 0, (seq.spec_verifies, seq.spec_accepted))
            )  # fmt: skip
            if seq.finished:
                del self.seqs[rid], self.rids[seq], self.sent[rid]
        self._send_stats(outputs)

    def _send_stats(self, outputs: list[tuple[Any, ...]]) -> None:
        now = time.monotonic()
        due = now - self.last_stats >= STATS_INTERVAL_S or not self.engine.has_work
        if not outputs and not due:
            return
        stats = self.engine.stats() if due else None
        if due:
            self.last_stats = now
        self.outbox.send(("step", outputs, stats))


def main(config: EngineConfig, log_level: int, inbox: Connection, outbox: Connection) -> None:
    """Entry point of the engine process (spawned by `AsyncEngine.start`)."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = Engine(config)
    except BaseException:
        outbox.send(("init_failed", traceback.format_exc()))
        return
    # the context length lets the HTTP side refuse a prompt too long to fit before tokenizing it
    ready = {**engine.info(), "max_model_len": engine.model_config.max_position_embeddings}
    outbox.send(("ready", {**ready, "stats": engine.stats()}))
    try:
        with contextlib.suppress(EOFError, BrokenPipeError):  # the HTTP process went away
            _Worker(engine, inbox, outbox).run()
    finally:
        engine.close()  # tensor-parallel workers, if any
