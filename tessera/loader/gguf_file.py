"""GGUF checkpoints through the `gguf` package: metadata -> ModelConfig, tensors dequantized to HF
names, tokenizer and chat template from the metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tessera.model_config import ModelConfig

_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        self.reader = gguf.GGUFReader(str(self.path))

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    @cached_property
    def arch(self) -> str:
        return self.field("general.architecture")

    @cached_property
    def config(self) -> ModelConfig:
        a = self.arch
        if a not in _ARCH:
            raise ValueError(
                f"{self.path.name}: unsupported GGUF architecture {a!r}; supported: {sorted(_ARCH)}"
            )
        heads = self.field(f"{a}.attention.head_count")
        hidden = self.field(f"{a}.embedding_length")
        names = {t.name for t in self.reader.tensors}
        eos = self.field("tokenizer.ggml.eos_token_id")
        return ModelConfig(
            architecture=_ARCH[a],
            vocab_size=len(self.reader.fields["tokenizer.ggml.tokens"].data),
            hidden_size=hidden,
            intermediate_size=self.field(f"{a}.feed_forward_length"),
            num_layers=self.field(f"{a}.block_count"),
            num_heads=heads,
            num_kv_heads=self.field(f"{a}.attention.head_count_kv", heads),
            head_dim=self.field(f"{a}.attention.key_length", hidden // heads),
            rms_norm_eps=self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=self.field(f"{a}.rope.freq_base", 10000.0),
            rope_scaling=_rope_scaling(self, a),
            max_position_embeddings=self.field(f"{a}.context_length", 4096),
            tie_word_embeddings="output.weight" not in names,
            attention_bias=any(n.endswith("attn_q.bias") for n in names),
            qk_norm=any("attn_q_norm" in n for n in names),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(eos,) if eos is not None else (),
        )

    def tensor_types(self) -> dict[str, str]:
        """HF name -> GGML type name of every tensor (`QuantConfig.from_gguf` takes it)."""
        return {hf_name(t.name): t.tensor_type.name for t in self.reader.tensors}

    def weights(self, keep_blocks: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor) for every tensor: dequantized to float32, or where `keep_blocks(name)` says so
        its stored bytes, uint8 [rows, bytes per row] (a 1-D tensor is one row)."""
        import gguf

        for t in self.reader.tensors:
            name, kind = hf_name(t.name), t.tensor_type.name
            if kind not in _SUPPORTED_TYPES:
                raise ValueError(
                    f"{t.name}: GGUF type {kind} not supported (supported: {sorted(_SUPPORTED_TYPES)})"
                )
            if keep_blocks is not None and keep_blocks(name):
                yield name, self._unpermuted(name, torch.from_numpy(_stored_bytes(t)))
                continue
            array = gguf.quants.dequantize(t.data, t.tensor_type)
            # NOTE: copy: F32/F16 tensors are views of the read-only memory-mapped file.
            yield name, self._unpermuted(name, torch.from_numpy(np.array(array, dtype=np.float32, copy=True)))

    def raw_tensors(self) -> Iterator[tuple[str, str, torch.Tensor, tuple[int, int]]]:
        """(HF name, GGML type name, the stored bytes uint8 [rows, bytes per row], logical (rows, cols))
        for every tensor, not dequantized (`tessera.quant.gguf.repack` takes them); a 1-D tensor is one
        row."""
        for t in self.reader.tensors:
            cols = int(t.shape[0])  # ggml lists dimensions fastest first: ne0 is the length of a row
            rows = int(np.prod(t.shape[1:], dtype=np.int64))
            name = hf_name(t.name)
            yield (
                name,
                t.tensor_type.name,
                self._unpermuted(name, torch.from_numpy(_stored_bytes(t))),
                (rows, cols),
            )

    def _unpermuted(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Q and K rows as HF orders them. NOTE: llama.cpp's converter interleaves the rotary halves of Q
        and K rows for Llama-style checkpoints; undone so the rotate-half RoPE of HF (and ours) applies.
        A GGUF row is a whole number of blocks, so moving rows of stored bytes moves rows of values."""
        if self.arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
            cfg = self.config
            tensor = unpermute(tensor, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        return tensor.contiguous()


def _stored_bytes(t: Any) -> np.ndarray:
    """A reader tensor's bytes as uint8 [rows, bytes per row], copied out of the read-only memory map."""
    rows = int(np.prod(t.shape[1:], dtype=np.int64))
    return np.array(t.data, copy=True, order="C").view(np.uint8).reshape(rows, -1)


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        layer, base, suffix = parts[1], parts[2], parts[3]
        if base not in _LAYER_NAMES:
            raise KeyError(f"unknown GGUF tensor {gguf_name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{suffix}"
    if parts[0] not in _GLOBAL_NAMES:
        raise KeyError(f"unknown GGUF tensor {gguf_name!r}")
    return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"


def unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs interleaved) back to two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_scaling(f: GGUFFile, a: str) -> dict[str, Any] | None:
    kind = f.field(f"{a}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": f.field(f"{a}.rope.scaling.factor")}
    raise ValueError(f"GGUF rope scaling {kind!r} is not supported yet")
