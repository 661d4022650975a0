"""Prompt tokenization off the HTTP event loop, batched.

NOTE: a tokenizer's single `encode` holds the GIL (~0.6 ms for a 750-token prompt), so a burst of 256
requests held the event loop — and every stream it serves — for ~160 ms, and each request waited for the
ones before it. `encode_batch` releases the GIL and spreads a batch over the cores: prompts that arrive
while one batch is being encoded are encoded together next, in a worker thread. On 2 CPU cores
(`benchmarks/tokenize_burst.py`): a 256-prompt burst takes 90 ms instead of 157 and stalls the loop for
8 ms at most instead of 157.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tessera.loader.tokenizer import Tokenizer


class BatchEncoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.batches = 0  # encode_batch calls so far (tests read it)
        self._pending: list[tuple[str, asyncio.Future[list[int]]]] = []
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-tokenize")

    async def encode(self, text: str) -> list[int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        self._pending.append((text, future))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())  # held: the loop keeps only weak references
        return await future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                texts = [text for text, _ in batch]
                self.batches += 1
                try:
                    ids = await loop.run_in_executor(self._pool, self.tokenizer.encode_batch, texts)
                except Exception as exc:  # the tokenizer's error goes to each waiting request
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), row in zip(batch, ids, strict=True):
                    if not future.done():  # a request whose client left is cancelled already
                        future.set_result(row)
        finally:
            self._draining = False
