"""GGUF files written here in every supported tensor type load back to the weights they were made from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.loader.gguf_file import GGUFFile
from tessera.models.decoder import CausalLM

from .runner_driver import make_runner

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

HEADS, KV_HEADS, HIDDEN = 4, 2, 64
HF_CONFIG = dict(
    vocab_size=256,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# relative error of the dequantized weights, per type
TOLERANCE = {"F32": 0.0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 1e-2, "Q4_0": 0.15, "Q4_1": 0.15}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        base, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{_GGUF_NAMES[base]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]  # fmt: skip


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: interleave the two rotary halves of every head's rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path: Path, weights: dict[str, torch.Tensor], qtype_name: str) -> None:
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(128)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_merges([])
    w.add_eos_token_id(2)
    for name, tensor in weights.items():
        array = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            array = _permute(array, HEADS)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, KV_HEADS)
        if array.ndim == 1:  # norms stay F32, as llama.cpp keeps them
            w.add_tensor(_gguf_name(name), array)
        else:
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def hf() -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("qtype", list(TOLERANCE))
def test_every_type_loads_back_to_its_weights(qtype: str, hf: torch.nn.Module, tmp_path: Path) -> None:
    original = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    path = tmp_path / f"tiny-{qtype}.gguf"
    _write(path, original, qtype)
    f = GGUFFile(path)
    cfg = f.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.vocab_size) == (HEADS, KV_HEADS, 2, 256)
    assert not cfg.tie_word_embeddings
    loaded = dict(f.weights())
    assert set(loaded) == set(original)
    for name, tensor in original.items():
        err = ((loaded[name] - tensor).norm() / tensor.norm()).item()
        assert err <= TOLERANCE[qtype] + 1e-7, (name, err)  # Q/K rows are back in HF order
    if qtype == "F32":
        model = CausalLM(cfg).eval()
        model.load_weights(loaded.items())
        ids = torch.randint(0, 256, (9,))
        got = make_runner(model, num_pages=8).run([(Sequence(ids.tolist(), SamplingParams()), 9)])[0]
        with torch.no_grad():
            ref = hf(ids[None]).logits[0, -1]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
