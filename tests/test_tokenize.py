"""BatchEncoder: prompts tokenized off the event loop, those arriving together encoded as one batch."""

from __future__ import annotations

import asyncio

import pytest

from tessera.loader.gguf_file import GGUFFile
from tessera.loader.model_loader import default_model_path
from tessera.loader.tokenizer import Tokenizer
from tessera.server.tokenize import BatchEncoder


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(default_model_path()).field)


def test_concurrent_prompts_are_batched_and_each_gets_its_own_ids(tokenizer: Tokenizer) -> None:
    texts = [f"Prompt number {i}: " + "word " * (i % 17) for i in range(64)]
    encoder = BatchEncoder(tokenizer)

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(encoder.encode(t) for t in texts))

    got = asyncio.run(main())
    encoder.close()
    assert got == [tokenizer.encode(t) for t in texts]
    assert 1 <= encoder.batches < len(texts)  # arrivals while a batch ran went into the next one


def test_an_error_reaches_its_batch_and_a_cancelled_request_leaves_the_rest(tokenizer: Tokenizer) -> None:
    encoder = BatchEncoder(tokenizer)

    async def main() -> None:
        bad = asyncio.ensure_future(encoder.encode(None))  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await bad
        first = asyncio.ensure_future(encoder.encode("left early"))
        second = asyncio.ensure_future(encoder.encode("still here"))
        await asyncio.sleep(0)
        first.cancel()
        assert await second == tokenizer.encode("still here")
        assert await encoder.encode("after") == tokenizer.encode("after")  # the encoder still works

    asyncio.run(main())
    encoder.close()
