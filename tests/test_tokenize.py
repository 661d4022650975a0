"""BatchEncoder: prompts tokenized off the event loop, those arriving together encoded as one batch; a text
the tokenizer refuses fails its own request only, and a large text never holds up the small ones."""

from __future__ import annotations

import asyncio

import pytest

from tessera.loader.gguf_file import GGUFFile
from tessera.loader.model_loader import default_model_path
from tessera.loader.tokenizer import Tokenizer
from tessera.server.tokenize import BatchEncoder, chars_per_token_bound


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


def test_an_error_reaches_its_request_and_a_cancelled_request_leaves_the_rest(tokenizer: Tokenizer) -> None:
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


def test_a_text_the_tokenizer_refuses_fails_only_its_own_request(tokenizer: Tokenizer) -> None:
    """A lone surrogate (valid JSON, not valid UTF-8) in a burst of good prompts: the tokenizer raises for
    the batch, and only the bad prompt's request gets the error."""
    good = [f"Prompt {i} about the sea" for i in range(20)]
    texts = [*good[:7], "bad \ud800 text", *good[7:]]
    encoder = BatchEncoder(tokenizer)

    async def main() -> list[list[int] | BaseException]:
        return await asyncio.gather(*(encoder.encode(t) for t in texts), return_exceptions=True)

    got = asyncio.run(main())
    encoder.close()
    assert isinstance(got[7], TypeError)
    assert got[:7] + got[8:] == [tokenizer.encode(t) for t in good]
    assert encoder.batches == 1  # the bad text was in one batch with all the good ones


def test_a_large_text_does_not_hold_up_small_ones(tokenizer: Tokenizer) -> None:
    """A text over `large_chars` is encoded in its own lane: small prompts sent after it finish first."""
    large = "the sea is wide and the fish swim " * 20_000  # 680k characters, ~0.4 s of encoding
    encoder = BatchEncoder(tokenizer)

    async def main() -> tuple[bool, list[int]]:
        big = asyncio.ensure_future(encoder.encode(large))
        await asyncio.sleep(0)  # the large one has started
        small = await asyncio.gather(*(encoder.encode(f"small {i}") for i in range(8)))
        big_done_first = big.done()
        assert small == [tokenizer.encode(f"small {i}") for i in range(8)]
        return big_done_first, await big

    big_done_first, big_ids = asyncio.run(main())
    encoder.close()
    assert not big_done_first and encoder.large == 1
    assert big_ids == tokenizer.encode_batch([large])[0]


def test_no_text_longer_than_the_bound_fits_fewer_tokens(tokenizer: Tokenizer) -> None:
    """The characters-per-token bound that refuses over-long prompts unread: no vocabulary entry spells
    more characters than it, and long runs of one token (the most characters per token) stay under it."""
    bound = chars_per_token_bound(tokenizer)
    spelled = [len(tokenizer.decode([t], skip_special_tokens=False)) for t in range(tokenizer.vocab_size)]
    assert 1 < max(spelled) <= bound
    for text in ("#" * 4000, " " * 4000, "\n" * 4000, "a" * 4000, "\u00e9" * 4000):
        assert len(text) <= bound * len(tokenizer.encode(text)), text[:4]
