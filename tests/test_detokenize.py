"""Incremental detokenization against decoding everything each time, on the embedded tokenizer."""

from __future__ import annotations

import random

import pytest

from tessera.engine.detokenize import IncrementalDetokenizer, output_text
from tessera.engine.sampling import SamplingParams
from tessera.loader.gguf_file import GGUFFile
from tessera.loader.model_loader import default_model_path
from tessera.loader.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is Paris. Naïve café, jalapeño — déjà vu!",
    "你好世界。東京は日本の首都です。🚀🔥 emojis split over byte tokens 👩‍👩‍👧",
    "  leading spaces,\ttabs\nand newlines\n\n  def f(x):\n      return x ** 2",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf(GGUFFile(default_model_path()).field)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_only_grows_and_ends_as_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    params = SamplingParams()
    detok = IncrementalDetokenizer(tokenizer, params, eos=(0,))
    streamed = []
    for n in range(1, len(ids) + 1):
        streamed.append(detok.text(ids[:n]))
        full = tokenizer.decode(ids[:n])
        assert full.startswith(streamed[-1])  # never a character the full decode would not have there
        assert "\ufffd" not in streamed[-1]  # half a character is held back, not sent
        if n > 1:
            assert streamed[-1].startswith(streamed[-2])  # a client appending deltas stays right
    assert streamed[-1] == tokenizer.decode(ids) == text
    assert detok.text(ids, final=True) == output_text(tokenizer, ids, params, (0,))


def test_random_token_ids_match_the_full_decode_where_it_is_complete(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(60)]
        detok = IncrementalDetokenizer(tokenizer, SamplingParams(), eos=())
        for n in range(1, len(ids) + 1):
            got, full = detok.text(ids[:n]), tokenizer.decode(ids[:n])
            assert full.startswith(got) or "\ufffd" in full  # random bytes may never form a character
            if not full.endswith("\ufffd") and "\ufffd" not in full:
                assert got == full


def test_eos_and_stop_strings(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("one two three four")
    eos = tokenizer.encode("<|im_end|>") or [2]
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=[" three"]), eos=(eos[-1],))
    assert detok.text(ids[:2]) == "one two"
    assert detok.text(ids) == "one two"  # cut at the stop string
    plain = IncrementalDetokenizer(tokenizer, SamplingParams(), eos=(eos[-1],))
    assert plain.text([*ids, eos[-1]]) == "one two three four"  # a trailing EOS is not text


def test_hits_stop_finds_a_stop_string_across_tokens_once_it_is_complete(tokenizer: Tokenizer) -> None:
    text = "The answer is forty-two. Then more text follows here."
    ids = tokenizer.encode(text)
    params = SamplingParams(stop=("forty-two.",))
    detok = IncrementalDetokenizer(tokenizer, params, eos=())
    hits = [detok.hits_stop(ids[:n]) for n in range(1, len(ids) + 1)]
    first = hits.index(True)
    # the first prefix whose full decode contains the stop string, whatever the tokens it spans
    assert first == next(n for n in range(1, len(ids) + 1) if "forty-two." in tokenizer.decode(ids[:n])) - 1
    assert len(tokenizer.encode("forty-two.")) > 1  # it does span several tokens
    assert detok.text(ids) == "The answer is "
