"""Tokenizer (HF `tokenizers`) and chat template (jinja2), from `tokenizer.json` or GGUF metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2.sandbox

# llama.cpp's pre-tokenizer names for byte-level BPE vocabularies and the split they stand for.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_PRE_SPLIT = {
    "llama-bpe": _WORDS + r"\p{N}{1,3}" + _REST,
    "qwen2": _WORDS + r"\p{N}" + _REST,
}
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, tok: Any, chat_template: str | None, bos: str | None, eos: str | None) -> None:
        self.tok = tok
        self.bos_token, self.eos_token = bos, eos
        self.chat_template = chat_template
        self._template = _compile(chat_template) if chat_template else None

    def __reduce__(self) -> tuple[Any, ...]:
        # the server's engine process sends its tokenizer to the HTTP process; a compiled jinja template
        # does not pickle, its source does
        return (Tokenizer, (self.tok, self.chat_template, self.bos_token, self.eos_token))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, on every core (and without the GIL)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send plain prompts")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """This tokenizer with another chat template (`--chat-template`)."""
        return Tokenizer(self.tok, chat_template, self.bos_token, self.eos_token)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        return cls(
            tok, config.get("chat_template"), _text(config.get("bos_token")), _text(config.get("eos_token"))
        )

    @classmethod
    def from_gguf(cls, field: Any) -> Tokenizer:
        """Rebuild a byte-level BPE tokenizer from GGUF metadata (`field(key, default)`)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        kind = field("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} not supported yet (byte-level BPE 'gpt2' is)")
        tokens: list[str] = list(field("tokenizer.ggml.tokens"))
        merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        tok.pre_tokenizer = _pre_tokenizer(field("tokenizer.ggml.pre", "gpt2"), pre_tokenizers, Regex)
        tok.decoder = decoders.ByteLevel()
        types = field("tokenizer.ggml.token_type") or []
        special = [tokens[i] for i, t in enumerate(types) if t in (_CONTROL, _USER_DEFINED)]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
        return cls(
            tok,
            field("tokenizer.chat_template"),
            tokens[bos] if bos is not None else None,
            tokens[eos] if eos is not None else None,
        )


def _pre_tokenizer(pre: str, pre_tokenizers: Any, regex: Any) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    if pre == "gpt2":
        return byte_level
    if pre == "smollm":  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_SPLIT:
        split = pre_tokenizers.Split(regex(_PRE_SPLIT[pre]), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence([split, byte_level])
    raise ValueError(
        f"GGUF pre-tokenizer {pre!r} not supported yet (supported: gpt2, smollm, {', '.join(_PRE_SPLIT)})"
    )


def _compile(template: str) -> jinja2.Template:
    # NOTE: chat templates come with the checkpoint: render them sandboxed.
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
