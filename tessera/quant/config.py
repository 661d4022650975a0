"""Which weight format each layer of a model gets: `QuantConfig`, built once from an HF checkpoint's
`quantization_config`, from `--quantization`, or from a GGUF file's tensor types.

    cfg = QuantConfig.resolve(hf_config_dict, quantization=args.quantization)   # None: unquantized
    method = cfg.method_for("model.layers.0.self_attn.qkv_proj") if cfg else None
    experts = cfg.experts_method_for("model.layers.0.mlp.experts") if cfg else None

Checkpoint formats: `quant_method` "fp8" (per-tensor scales, or 128x128 blocks with `weight_block_size`;
activation scheme "dynamic", or "static" whose calibrated input scales are loaded but not used: see
`Fp8LinearMethod`) and "mxfp4" (gpt-oss: only the experts are MXFP4, as HF quantizes them).
Online (`--quantization`, from a bf16/f32 checkpoint): see `ONLINE`. Never quantized: the embeddings and
the LM head (neither takes a LinearMethod; only a GGUF file's keep their stored blocks, see
`vocab_method_for`), MoE routers, and what the checkpoint lists in `modules_to_not_convert` /
`ignored_layers` (HF's matching: a regex from the start up to a module boundary, or a dotted suffix).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tessera.layers.expert_format import ExpertsMethod
from tessera.layers.linear import LinearMethod
from tessera.layers.vocab_parallel import VocabMethod
from tessera.quant import fp8, gguf
from tessera.quant.methods import Fp8LinearMethod, GGUFLinearMethod, GGUFVocabMethod, Mxfp4LinearMethod
from tessera.quant.moe_methods import Fp8ExpertsMethod, Mxfp4ExpertsMethod

log = logging.getLogger(__name__)

METHODS = ("fp8", "mxfp4", "gguf")
# --quantization NAME -> (method, fp8 scheme), for a bf16/f32 checkpoint quantized at load; "fp8" is
# per-channel weights with per-token dynamic activations (vLLM's ptpc_fp8, SGLang's w8a8_fp8)
ONLINE: dict[str, tuple[str, str | None]] = {
    "fp8": ("fp8", "per_channel"),
    "fp8_block": ("fp8", "block"),
    "mxfp4": ("mxfp4", None),
}
# a fused layer's name -> the checkpoint modules it holds, in order
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "fused_qkv_a_proj_with_mqa": ("q_a_proj", "kv_a_proj_with_mqa"),
}
# last name components never quantized: tables, the head, routers (tiny, and routing wants precision)
ALWAYS_UNQUANTIZED = ("embed_tokens", "lm_head", "gate", "router", "shared_expert_gate")
# last name components of the vocabulary tables: asked for a VocabMethod, not a LinearMethod
VOCAB_TABLES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class QuantConfig:
    """`method`: "fp8", "mxfp4" or "gguf". `scheme`: fp8's "per_tensor", "per_channel" or "block".
    `checkpoint`: weights arrive quantized (else quantized once after loading). `ignored`: module
    patterns left unquantized. `gguf_types`: module name -> ggml type name (GGUF only)."""

    method: str
    scheme: str | None = None
    checkpoint: bool = False
    static_input_scale: bool = False
    ignored: tuple[str, ...] = ()
    gguf_types: Mapping[str, str] = field(default_factory=dict)
    packed_modules: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(PACKED_MODULES))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}: one of {', '.join(METHODS)}")
        if self.method == "fp8" and self.scheme not in fp8.SCHEMES:
            raise ValueError(f"fp8 needs a scheme, one of {', '.join(fp8.SCHEMES)}; got {self.scheme!r}")
        if self.method == "gguf" and not self.checkpoint:
            raise ValueError("GGUF weights come from a GGUF file: use QuantConfig.from_gguf")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> QuantConfig | None:
        """From an HF `config.json` dict; None when it has no `quantization_config`."""
        q = hf_config.get("quantization_config")
        if not q:
            return None
        method = str(q.get("quant_method", "")).lower()
        ignored = tuple(q.get("modules_to_not_convert") or q.get("ignored_layers") or ())
        if method == "fp8":
            scheme, static = _fp8_checkpoint_scheme(q)
            return cls("fp8", scheme, checkpoint=True, static_input_scale=static, ignored=ignored)
        if method == "mxfp4":
            return cls("mxfp4", checkpoint=True, ignored=ignored)
        raise ValueError(
            f"checkpoint quantization {method!r} is not supported: tessera loads quant_method 'fp8' "
            f"(per-tensor or 128x128 block scales) and 'mxfp4' checkpoints, and GGUF files"
        )

    @classmethod
    def from_flag(cls, name: str) -> QuantConfig:
        """Online quantization of a bf16/f32 checkpoint: `--quantization` in {fp8, fp8_block, mxfp4}."""
        if name not in ONLINE:
            raise ValueError(
                f"--quantization {name!r} is not supported: one of {', '.join(ONLINE)} (FP8 and GGUF "
                f"checkpoints are detected from the checkpoint itself)"
            )
        method, scheme = ONLINE[name]
        return cls(method, scheme)

    @classmethod
    def from_gguf(cls, tensor_types: Mapping[str, str]) -> QuantConfig:
        """From a GGUF file's tensor types: HF module name (a ".weight" suffix is dropped) -> ggml type
        name, as `GGUFFile.raw_tensors` yields them."""
        types = {name.removesuffix(".weight"): t for name, t in tensor_types.items()}
        return cls("gguf", checkpoint=True, gguf_types=types)

    @classmethod
    def resolve(
        cls, hf_config: Mapping[str, Any] | None, quantization: str | None = None
    ) -> QuantConfig | None:
        """The checkpoint's own format wins; `--quantization` quantizes an unquantized checkpoint, and
        must name the same method as a quantized one (its scheme is the checkpoint's)."""
        ckpt = cls.from_hf(hf_config or {})
        if quantization is None:
            return ckpt
        if quantization == "none":  # unquantized, as the checkpoint must be
            if ckpt is not None:
                raise ValueError(f"--quantization none: the checkpoint's weights are {ckpt.method}")
            return None
        online = cls.from_flag(quantization)
        if ckpt is None:
            return online
        if ckpt.method != online.method:
            raise ValueError(
                f"the checkpoint is quantized as {ckpt.method!r}; --quantization {quantization!r} cannot "
                f"re-quantize it (drop the flag, or use an unquantized checkpoint)"
            )
        if ckpt.scheme != online.scheme:
            log.info(
                "fp8 checkpoint scales are %s; --quantization %s follows them", ckpt.scheme, quantization
            )
        return ckpt

    # ------------------------------------------------------------------ per layer

    def method_for(self, prefix: str) -> LinearMethod | None:
        """The LinearMethod of the linear layer `prefix` (HF module name; fused ones like
        "...self_attn.qkv_proj" are looked up by their parts), or None for an unquantized layer."""
        parts = self._parts(prefix)
        if self._skipped(prefix, parts):
            return None
        if self.method == "gguf":
            return self._gguf_method(prefix, parts)
        if self.method == "mxfp4":
            # NOTE: HF's MXFP4 checkpoints (gpt-oss) quantize only the experts: dense layers stay bf16
            return None if self.checkpoint else Mxfp4LinearMethod()
        assert self.scheme is not None
        static = self.static_input_scale
        return Fp8LinearMethod(self.scheme, checkpoint=self.checkpoint, static_input_scale=static)

    def __call__(self, prefix: str) -> LinearMethod | ExpertsMethod | VocabMethod | None:
        """The format of module `prefix`: the models' `MethodFor` (experts are "...mlp.experts", the
        vocabulary tables "model.embed_tokens" and "lm_head")."""
        if prefix.endswith(".experts"):
            return self.experts_method_for(prefix)
        if prefix.rpartition(".")[2] in VOCAB_TABLES:
            return self.vocab_method_for(prefix)
        return self.method_for(prefix)

    def vocab_method_for(self, prefix: str) -> VocabMethod | None:
        """The format of the embedding or LM head `prefix` ("model.embed_tokens", "lm_head"): a GGUF
        file's blocks where its type has kernels (Q8_0, Q4_K, ...); otherwise plain rows in the model's
        dtype (F16/F32/BF16 tensors, a tied head absent from the file, every other method)."""
        if self.method != "gguf":
            return None
        method = self._gguf_method(prefix, [prefix])
        return None if method is None else GGUFVocabMethod(method.ggml_type)

    def experts_method_for(self, prefix: str) -> ExpertsMethod | None:
        """The format of the MoE experts under `prefix` (e.g. "model.layers.3.mlp.experts"), or None."""
        if self.method == "gguf" or self._skipped(prefix, [prefix]):
            return None
        if self.method == "mxfp4":
            return Mxfp4ExpertsMethod(checkpoint=self.checkpoint)
        assert self.scheme is not None
        return Fp8ExpertsMethod(self.scheme, checkpoint=self.checkpoint)

    def keeps_gguf_blocks(self, tensor: str) -> bool:
        """Whether GGUF tensor `tensor` (HF name, "....q_proj.weight", "model.embed_tokens.weight") loads
        in its stored blocks: its layer (the fused one holding it) keeps the GGUF format."""
        module = tensor.removesuffix(".weight")
        if self.method != "gguf" or module == tensor:
            return False
        head, _, last = module.rpartition(".")
        fused = next((f for f, parts in self.packed_modules.items() if last in parts), last)
        return isinstance(self(f"{head}.{fused}" if head else fused), GGUFLinearMethod | GGUFVocabMethod)

    def is_ignored(self, name: str) -> bool:
        """Whether module `name` is left unquantized by the checkpoint's own list or by default."""
        return name.rsplit(".", 1)[-1] in ALWAYS_UNQUANTIZED or any(
            _matches(name, pattern) for pattern in self.ignored
        )

    def _parts(self, prefix: str) -> list[str]:
        head, _, last = prefix.rpartition(".")
        names = self.packed_modules.get(last)
        return [f"{head}.{p}" if head else p for p in names] if names else [prefix]

    def _skipped(self, prefix: str, parts: list[str]) -> bool:
        ignored = [self.is_ignored(p) for p in parts]
        if all(ignored) or self.is_ignored(prefix):
            return True
        if any(ignored):
            raise ValueError(
                f"{prefix}: its parts {parts} are quantized unevenly (ignored: {ignored}); a fused layer "
                f"holds one format"
            )
        return False

    def _gguf_method(self, prefix: str, parts: list[str]) -> LinearMethod | None:
        types = {self.gguf_types.get(p) for p in parts}
        if None in types:
            return None  # not in the file (or not a matrix): nothing to keep quantized
        if len(types) > 1:
            log.info("%s: parts of ggml types %s, built unquantized (weights dequantized)", prefix, types)
            return None
        (ggml_type,) = types
        if ggml_type not in gguf.FORMATS:
            if ggml_type not in ("F32", "F16", "BF16"):
                log.warning("%s: ggml type %s has no kernels, dequantized at load", prefix, ggml_type)
            return None
        return GGUFLinearMethod(ggml_type)


def _fp8_checkpoint_scheme(q: Mapping[str, Any]) -> tuple[str, bool]:
    """(scheme, static activation scales) of an HF fp8 `quantization_config`, or a ValueError that says
    what is supported."""
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"fp8 checkpoint format {fmt!r} is not supported: only e4m3")
    act = str(q.get("activation_scheme", "dynamic")).lower()
    if act not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme {act!r} is not supported: 'dynamic' or 'static'")
    if q.get("expert_dtype", "fp8") != "fp8":
        raise ValueError(f"fp8 checkpoints with {q['expert_dtype']!r} experts are not supported: only fp8")
    if q.get("scale_fmt", "float") not in ("float", "ue8m0"):
        raise ValueError(f"fp8 scale_fmt {q['scale_fmt']!r} is not supported: 'float' or 'ue8m0'")
    block = q.get("weight_block_size")
    if block is None:
        return "per_tensor", act == "static"
    if list(block) != [fp8.BLOCK, fp8.BLOCK]:
        raise ValueError(f"fp8 weight_block_size {list(block)} is not supported: only [128, 128]")
    return "block", act == "static"


def _matches(name: str, pattern: str) -> bool:
    """HF's `should_convert_module` matching: `pattern` as a regex from the start of `name` up to a module
    boundary ("model.layers.*.self_attn" matches "model.layers.3.self_attn.o_proj", "mlp.gate" does not
    match "mlp.gate_proj"), or a dotted suffix ("lm_head", "mlp.gate")."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name) is not None
    except re.error:
        return False
