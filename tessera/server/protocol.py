"""OpenAI-compatible request bodies (the subset tessera serves), validated by pydantic.

A field tessera cannot honour yet (tools, response formats, best_of, ...) is refused by name rather than
dropped: a client would otherwise get a plausible answer that ignores what it asked for. Counts that set
one request's work (choices, stop strings, logprobs) are bounded here, before anything runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationInfo, field_validator

from tessera.engine.sampling import SamplingParams

MAX_N = 16  # choices of one prompt
MAX_CHOICES = 256  # prompts * n of one request
MAX_STOP = 16  # stop strings (OpenAI allows 4; vLLM any number)
MAX_STOP_CHARS = 256  # each searched for in a request's new text at every step
MAX_STOP_TOKEN_IDS = 256
MAX_LOGPROBS = 20  # OpenAI's top_logprobs bound; also completions' logprobs (OpenAI: 5, vLLM: 20)
INT64 = 2**63  # OpenAI's seed is an int64; torch takes seed + choice index (< 2**64) as it is
UNSUPPORTED = "not supported by tessera yet"


def valid_text(text: str, what: str = "text") -> str:
    """`text` if a tokenizer can take it. NOTE: JSON's \\ud800 escapes parse to a lone surrogate, which
    UTF-8 cannot hold: the tokenizer raised a TypeError (a 500, and its whole batch failed with it)."""
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(f"{what} holds a lone UTF-16 surrogate at character {exc.start}") from None
    return text


def _prompts(value: Any) -> list[str | list[int]]:
    """A completions prompt as a list of prompts: text, token ids, or a list of either (a batch)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(map(_is_id, value))):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a list of token ids, or a non-empty list of either")
    for i, prompt in enumerate(value):
        if isinstance(prompt, str) and prompt:
            valid_text(prompt, f"prompt {i}")
        elif not (isinstance(prompt, list) and prompt and all(map(_is_id, prompt))):
            raise ValueError(f"prompt {i} is not a non-empty string or list of token ids")
    return value


def _is_id(token: Any) -> bool:
    return isinstance(token, int) and not isinstance(token, bool)


def _content(value: Any) -> str:
    """A message's content as text: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(value, str):
        return valid_text(value, "content")
    if not isinstance(value, list):
        raise ValueError("must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise ValueError(f"part {i} is of type {kind!r}: only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"part {i} (text) has no string 'text'")
        texts.append(part["text"])
    return valid_text("\n".join(texts), "content")


def _stops(value: Any) -> tuple[str, ...]:
    stops = () if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise ValueError("must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise ValueError(f"{len(stops)} stop strings; at most {MAX_STOP}")
    for s in stops:
        if not 0 < len(s) <= MAX_STOP_CHARS:
            raise ValueError(f"a stop string must have 1 to {MAX_STOP_CHARS} characters, got {len(s)}")
        valid_text(s, "a stop string")
    return tuple(stops)


# Each unsupported field: what it may hold and still ask for nothing, and how to say so
_HARMLESS: dict[str, tuple[Any, str]] = {
    "tools": (lambda v: v is None or v == [], "send no tools"),
    "functions": (lambda v: v is None or v == [], "send no functions"),
    "tool_choice": (lambda v: v in (None, "none"), 'only "none"'),
    "function_call": (lambda v: v in (None, "none"), 'only "none"'),
    "response_format": (lambda v: v is None or v == {"type": "text"}, 'only {"type": "text"}'),
    "logit_bias": (lambda v: not v, "only an empty one"),
    "best_of": (lambda v: v is None or v == 1, "only 1"),
    "suffix": (lambda v: not v, "only an empty one"),
    "echo": (lambda v: not v, "only false"),
}


def _refuse_unsupported(value: Any, info: ValidationInfo) -> Any:
    harmless, hint = _HARMLESS[info.field_name]  # type: ignore[index]
    if not harmless(value):
        raise ValueError(f"{UNSUPPORTED} ({hint})")
    return value


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Annotated[tuple[str, ...], PlainValidator(_stops)] = ()
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Any = None
    repetition_penalty: float = Field(1.0, gt=0)  # vLLM's and SGLang's extensions from here on
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)

    _unsupported = field_validator("logit_bias")(_refuse_unsupported)

    def sampling(self, max_tokens: int, index: int, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=None if self.seed is None else self.seed + index,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            stop_token_ids=tuple(self.stop_token_ids or ()),
        )


class CompletionRequest(_Sampling):
    prompt: Annotated[list[str | list[int]], PlainValidator(_prompts)]  # one prompt, or a batch
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # the top this many with each token
    best_of: Any = None
    suffix: Any = None
    echo: Any = None

    _unsupported_here = field_validator("best_of", "suffix", "echo")(_refuse_unsupported)

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, prompts: list[str | list[int]], info: ValidationInfo) -> list[str | list[int]]:
        n = info.data.get("n", 1)
        if len(prompts) * n > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts of n={n} choices: more than {MAX_CHOICES} choices")
        return prompts

    def params(self) -> list[SamplingParams]:
        """One per choice of each prompt."""
        top = self.logprobs or 0
        return [self.sampling(self.max_tokens, i, self.logprobs is not None, top) for i in range(self.n)]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, PlainValidator(_content)]

    def for_template(self) -> dict[str, str]:
        # OpenAI's developer role is the system role of models trained before it existed
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    _unsupported_here = field_validator(
        "tools", "tool_choice", "functions", "function_call", "response_format"
    )(_refuse_unsupported)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return top

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    def params(self) -> list[SamplingParams]:
        top = self.top_logprobs or 0
        return [self.sampling(self.limit, i, self.logprobs, top) for i in range(self.n)]
