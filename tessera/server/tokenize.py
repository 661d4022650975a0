"""Prompt tokenization off the HTTP event loop, batched, each request isolated from the others.

NOTE: a tokenizer's single `encode` holds the GIL (~0.6 ms for a 750-token prompt), so a burst of 256
requests held the event loop — and every stream it serves — for ~160 ms, and each request waited for the
ones before it. `encode_batch` releases the GIL and spreads a batch over the cores: prompts that arrive
while one batch is being encoded are encoded together next, in a worker thread. On 2 CPU cores
(`benchmarks/tokenize_burst.py`): a 256-prompt burst takes 90 ms instead of 157 and stalls the loop for
8 ms at most instead of 157.

Two rules keep one request from hurting the others: a batch the tokenizer refuses is encoded again text by
text, so only the text at fault gets the error (one lone surrogate failed its whole batch of requests);
and a large text (`LARGE_CHARS`) is encoded in a thread of its own, so small prompts never wait behind it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from tessera.loader.tokenizer import Tokenizer

LARGE_CHARS = 16_384  # ~5 ms of encoding: above it a text takes the large lane


class BatchEncoder:
    def __init__(self, tokenizer: Tokenizer, large_chars: int = LARGE_CHARS) -> None:
        self.tokenizer = tokenizer
        self.large_chars = large_chars
        self.batches = 0  # encode_batch calls of the batched lane so far (tests read them)
        self.large = 0  # texts encoded in the large lane so far
        self._pending: list[tuple[str, asyncio.Future[list[int]]]] = []
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessera-tokenize")
        self._large = ThreadPoolExecutor(1, thread_name_prefix="tessera-tokenize-large")

    async def encode(self, text: str) -> list[int]:
        loop = asyncio.get_running_loop()
        if isinstance(text, str) and len(text) > self.large_chars:  # one at a time, beside the batches
            self.large += 1
            return await loop.run_in_executor(self._large, self._encode_alone, text)
        future: asyncio.Future[list[int]] = loop.create_future()
        self._pending.append((text, future))
        if not self._draining:
            self._draining = True
            self._task = loop.create_task(self._drain())  # held: the loop keeps only weak references
        return await future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._large.shutdown(wait=False, cancel_futures=True)

    def _encode_alone(self, text: str) -> list[int]:
        return self.tokenizer.encode_batch([text])[0]  # a batch of one: encoded without the GIL

    def _encode_each(self, texts: list[str]) -> list[list[int] | Exception]:
        """Each text's ids, or the error the tokenizer raised for that text alone."""
        out: list[list[int] | Exception] = []
        for text in texts:
            try:
                out.append(self._encode_alone(text))
            except Exception as exc:
                out.append(exc)
        return out

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                texts = [text for text, _ in batch]
                self.batches += 1
                results: list[list[int]] | list[list[int] | Exception]
                try:
                    results = await loop.run_in_executor(self._pool, self.tokenizer.encode_batch, texts)
                except Exception:  # some text of the batch is at fault: find which, and fail it alone
                    results = await loop.run_in_executor(self._pool, self._encode_each, texts)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():  # a request whose client left is cancelled already
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            self._draining = False


def chars_per_token_bound(tokenizer: Tokenizer) -> int:
    """The most characters one token can stand for: its longest vocabulary entry. An entry of a byte-level
    vocabulary has a character per byte, and a character is a byte or more; a SentencePiece entry spells
    its own characters (a byte-fallback entry, `<0xE2>`, one byte). So a text longer than the context times
    this cannot fit the context, whatever its tokens: refused without tokenizing it."""
    return max(map(len, tokenizer.tok.get_vocab(with_added_tokens=True)), default=1)
