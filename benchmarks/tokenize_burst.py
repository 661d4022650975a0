"""A burst of 256 prompts (256-1024 words, the serving benchmark's) tokenized on the HTTP event loop one
by one vs through `BatchEncoder`: the burst's time and the longest stall of a 1 ms heartbeat on the loop
(every stream the server carries waits that long). CPU only.

python -m benchmarks.tokenize_burst
"""

from __future__ import annotations

import asyncio
import time

from tessera.bench.serve import make_prompts
from tessera.loader.gguf_file import GGUFFile
from tessera.loader.model_loader import default_model_path
from tessera.loader.tokenizer import Tokenizer
from tessera.server.tokenize import BatchEncoder


async def heartbeat(stop: asyncio.Event, gaps: list[float]) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def burst(tokenizer: Tokenizer, prompts: list[str], batched: bool) -> tuple[float, float]:
    encoder = BatchEncoder(tokenizer)

    async def inline(prompt: str) -> list[int]:
        await asyncio.sleep(0)  # each request's handler gets its turn, then tokenizes on the loop
        return tokenizer.encode(prompt)

    stop, gaps = asyncio.Event(), []
    beat = asyncio.create_task(heartbeat(stop, gaps))
    await asyncio.sleep(0.01)
    start = time.perf_counter()
    await asyncio.gather(*((encoder.encode if batched else inline)(p) for p in prompts))
    took = time.perf_counter() - start
    stop.set()
    await beat
    encoder.close()
    return took, max(gaps)


def main() -> None:
    tokenizer = Tokenizer.from_gguf(GGUFFile(default_model_path()).field)
    prompts = make_prompts(256, 256, 1024, 0)
    for batched in (False, True, False, True):
        took, stall = asyncio.run(burst(tokenizer, prompts, batched))
        name = "BatchEncoder" if batched else "inline encode"
        print(f"{name:<14} 256 prompts in {took * 1e3:.0f} ms, longest event-loop stall {stall * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
