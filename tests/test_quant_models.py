"""Quantized formats through whole models on CPU: each model family quantized online (FP8 per channel,
MXFP4) equals the same model run with its weights replaced by the quantized ones dequantized; FP8 and
MXFP4 checkpoints in the HF layout (per-tensor and 128x128 block scales, per-expert and fused expert
tensors) load and match their dequantized weights; the embedded GGUF model served in its Q4_1/Q8_0
blocks, its embedding and tied head included, matches the dequantized model (logits, greedy tokens) and
holds the file's bytes; a quantized model runs in the engine, padded through emulated piecewise
graphs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.layers.linear import LinearBase, UnquantizedLinearMethod
from tessera.layers.moe import Experts, UnquantizedExpertsMethod
from tessera.loader.model_loader import build_model, dummy_model, hf_model, load_model
from tessera.models.decoder import CausalLM
from tessera.quant import fp8, mxfp4
from tessera.quant.methods import GGUFVocabMethod
from tests.conftest import rel_err
from tests.runner_driver import make_runner
from tests.tp_model_workers import BASE, CONFIGS, logits, write_folder

F32, CPU = torch.float32, torch.device("cpu")


def _quantized(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, LinearBase | Experts)
        and not isinstance(m.method, UnquantizedLinearMethod | UnquantizedExpertsMethod)
    ]


def _dequantized_twin(quantized: CausalLM, plain: CausalLM) -> CausalLM:
    """`plain` (the same architecture, unquantized) with every quantized layer's weights set to the
    quantized layer's, dequantized: the reference a quantized model must equal up to its activations."""
    modules = dict(plain.named_modules())
    with torch.no_grad():
        for name in _quantized(quantized):
            layer, twin = dict(quantized.named_modules())[name], modules[name]
            if isinstance(layer, Experts):
                gate_up, down = layer.method.dequantize(layer)
                twin.gate_up_proj.copy_(gate_up)
                twin.down_proj.copy_(down)
            else:
                twin.weight.copy_(layer.method.dequantize(layer))
    return plain


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-models")
    return {family: write_folder(root, family) for family in CONFIGS}


# (family, --quantization, bound on the relative error against the dequantized twin): MXFP4 is
# weight-only, so only the float order differs; FP8 also rounds each token's activations to e4m3 in
# every linear layer (3 mantissa bits: ~3.6% rms a value, about as much on a dot product of random
# values, compounding over the layers: 2-5% measured on these models)
CASES = [
    ("llama", "fp8", 6e-2),
    ("llama", "mxfp4", 1e-5),
    ("qwen3", "mxfp4", 1e-5),
    ("qwen3-moe", "mxfp4", 1e-5),
    ("qwen3-moe", "fp8", 6e-2),
    ("deepseek-v2", "fp8", 6e-2),
]


@pytest.mark.parametrize(("family", "quantization", "bound"), CASES)
def test_online_quantized_model_equals_its_dequantized_weights(
    folders: dict[str, Path], family: str, quantization: str, bound: float
) -> None:
    quantized = dummy_model(folders[family], F32, CPU, quantization=quantization)
    names = _quantized(quantized)
    assert names and all("embed" not in n and "lm_head" not in n and "gate." not in n for n in names)
    plain = dummy_model(folders[family], F32, CPU)
    got = logits(quantized)[0]
    original = logits(plain)[0]
    want = logits(_dequantized_twin(quantized, plain))[0]
    err = rel_err(got, want)
    assert err < bound, (family, quantization, err)
    # the check is sharp: quantizing moved the logits by far more than what is left (MXFP4), or at all
    assert rel_err(got, original) > (10 * err if quantization == "mxfp4" else 1e-3)


@pytest.mark.parametrize("quantization", [None, "fp8", "mxfp4"])
def test_compile_strategy_keeps_quantized_kernels_inside_the_bf16_pieces(
    folders: dict[str, Path], quantization: str | None
) -> None:
    """torch.compile(fullgraph=True) traces the quantized ops as opaque ops: the graph breaks only at
    attention, one piece more than layers, as unquantized; the padded replays equal eager."""
    model = dummy_model(folders["qwen3-moe"], F32, CPU, quantization=quantization)
    settings = dict(emulate_graphs_on_cpu=True, piecewise_cuda_graph_tokens=(8, 16),
                    piecewise_cuda_graph_strategy="compile")  # fmt: skip
    runner = make_runner(model, num_pages=64, page_size=4, attention_backend="torch", **settings)
    report = runner.graphs.report
    assert report is not None and report.num_pieces == model.config.num_layers + 1
    graphed, stats = logits(model, **settings)
    assert stats["replays"] == {"piecewise": {"16": 1, "8": 1}}
    assert rel_err(graphed, logits(model)[0]) < 1e-5


def test_mla_absorbs_a_dequantized_kv_b_proj(folders: dict[str, Path]) -> None:
    model = dummy_model(folders["deepseek-v2"], F32, CPU, quantization="fp8")
    attn = model.model.layers[0].self_attn
    assert not hasattr(attn.kv_b_proj, "weight")  # quantized: fp8 weight and scales only
    w_kc, _ = attn.absorbed_weights()
    want = attn.kv_b_proj.method.dequantize(attn.kv_b_proj).view(attn.heads, -1, w_kc.shape[-1])
    assert torch.equal(w_kc, want[:, : w_kc.shape[1]])


def _forced_greedy_agreement(reference: CausalLM, model: CausalLM, steps: int = 32) -> float:
    """Greedy decoding of `reference` over 16 random prompts; the share of its `steps` tokens per prompt
    that `model`, reading the same tokens, picks too (teacher-forced: one flip does not derail the rest)."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 250, (3 + i % 9,), generator=gen).tolist() for i in range(16)]
    runners = [
        make_runner(m, num_pages=512, page_size=4, attention_backend="torch") for m in (reference, model)
    ]
    seqs = [[Sequence(list(p), SamplingParams()) for p in prompts] for _ in runners]
    out = [r.run([(s, len(s.prompt_token_ids)) for s in ss]) for r, ss in zip(runners, seqs, strict=True)]
    agree = 0
    for _ in range(steps):
        want, got = (o.argmax(-1) for o in out)
        agree += int((want == got).sum())
        for ss in seqs:
            for s, token in zip(ss, want.tolist(), strict=True):
                s.output_token_ids.append(token)
        out = [r.run([(s, 1) for s in ss]) for r, ss in zip(runners, seqs, strict=True)]
    return agree / (steps * len(prompts))


# sizes every format takes whole (MXFP4: 32-wide input blocks in every layer)
GREEDY = {
    "llama": {"intermediate_size": 128},
    "deepseek-v2": {"intermediate_size": 128, "moe_intermediate_size": 32, "v_head_dim": 16},
}


@pytest.mark.parametrize("quantization", ["fp8", "fp8_block", "mxfp4"])
@pytest.mark.parametrize("family", list(GREEDY))
def test_greedy_decoding_agrees_with_the_dequantized_weights(
    tmp_path: Path, family: str, quantization: str
) -> None:
    folder = tmp_path / family
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASE | CONFIGS[family] | GREEDY[family]))
    model = dummy_model(folder, F32, CPU, quantization=quantization)
    twin = _dequantized_twin(model, dummy_model(folder, F32, CPU))
    agreement = _forced_greedy_agreement(twin, model)
    # MXFP4 is weight-only: the same weights give the same tokens. FP8 rounds activations too, which
    # flips near-ties of these random models' flat logits now and then (95.5-97% measured)
    assert agreement == 1.0 if quantization == "mxfp4" else agreement >= 0.95, agreement


# ------------------------------------------------------------------ checkpoints in the HF layout

BLOCK_BASE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
              "num_key_value_heads": 4, "head_dim": 32}  # fmt: skip


def _fp8_quantize(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's (fp8 weight, scale): per-tensor scalar, or [N/128, K/128] blocks."""
    if scheme == "per_tensor":
        scale = w.abs().amax() / fp8.fp8_max(torch.float8_e4m3fn)
        return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
    n, k = w.shape
    blocks = w.view(n // 128, 128, k // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / fp8.fp8_max(torch.float8_e4m3fn)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(n, k)
    return q, scale


def _fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 0:
        return q.float() * scale
    blocks = q.float().view(scale.shape[0], 128, scale.shape[1], 128) * scale[:, None, :, None]
    return blocks.view(q.shape)


def _write_checkpoint(folder: Path, config: dict[str, Any], scheme: str) -> dict[str, torch.Tensor]:
    """The dummy weights of `config`, each linear and expert matrix as an FP8 checkpoint stores it
    (`weight` fp8 + `weight_scale` or `weight_scale_inv`); returns them dequantized, as the reference."""
    from safetensors.torch import save_file

    from tessera.loader.model_loader import dummy_weights
    from tessera.model_config import ModelConfig

    folder.mkdir()
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if scheme == "block":
        quant["weight_block_size"] = [128, 128]
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": quant}))
    tensors, reference = {}, {}
    for name, t in dummy_weights(ModelConfig.from_hf(config), CPU):
        w = t.materialize()
        linear = name.endswith("proj.weight") and w.dim() == 2
        if not linear:
            tensors[name] = reference[name] = w
            continue
        q, scale = _fp8_quantize(w, scheme)
        tensors[name] = q
        tensors[name.replace(".weight", ".weight_scale_inv" if scheme == "block" else ".weight_scale")] = (
            scale
        )
        reference[name] = _fp8_dequantize(q, scale)
    save_file(tensors, str(folder / "model.safetensors"))
    return reference


@pytest.mark.parametrize("scheme", ["per_tensor", "block"])
@pytest.mark.parametrize("family", ["llama", "qwen3-moe"])
def test_fp8_checkpoint_matches_its_dequantized_weights(tmp_path: Path, family: str, scheme: str) -> None:
    moe = family != "llama"
    config = BASE | CONFIGS[family] | BLOCK_BASE | {"attention_bias": False}
    if moe:
        config["moe_intermediate_size"] = 128
    reference = _write_checkpoint(tmp_path / "ckpt", config, scheme)
    model = hf_model(tmp_path / "ckpt", F32, CPU)
    # qkv, o and gate_up, down (or the experts) of each layer; their weights kept in fp8
    assert len(_quantized(model)) == (3 if moe else 4) * config["num_hidden_layers"]
    stored = {n: t.dtype for n, t in model.named_buffers() if n.endswith(("qweight", "w13", "w2"))}
    assert stored and set(stored.values()) == {torch.float8_e4m3fn}, stored
    plain = build_model(model.config, F32, CPU)
    plain.load_weights(reference.items())
    twin = build_model(model.config, F32, CPU)
    twin.load_weights(reference.items())
    _dequantized_twin(model, twin)  # the loaded fp8 values and scales give back the checkpoint's weights
    for (name, got), want in zip(twin.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    err = rel_err(logits(model)[0], logits(plain)[0])
    assert err < 8e-2, err  # what is left: each token's activations rounded to fp8 in every linear layer


def test_mxfp4_checkpoint_of_fused_expert_tensors(tmp_path: Path) -> None:
    """gpt-oss's layout: `experts.gate_up_proj_blocks` / `_scales` (and down's), dense layers bf16."""
    from safetensors.torch import save_file

    from tessera.loader.model_loader import dummy_weights
    from tessera.model_config import ModelConfig

    config = BASE | CONFIGS["qwen3-moe"]
    folder = tmp_path / "mx"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}})
    )
    cfg = ModelConfig.from_hf(config)
    tensors = {name: t.materialize() for name, t in dummy_weights(cfg, CPU)}
    reference = dict(tensors)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}.mlp.experts"
        experts = range(cfg.moe.num_experts)  # type: ignore[union-attr]
        gate, up, down = (
            [tensors.pop(f"{prefix}.{e}.{k}_proj.weight") for e in experts] for k in ("gate", "up", "down")
        )
        fused = {
            "gate_up_proj": torch.cat((torch.stack(gate), torch.stack(up)), dim=1),
            "down_proj": torch.stack(down),
        }
        for proj, w in fused.items():
            blocks, scales = mxfp4.quantize(w)
            tensors[f"{prefix}.{proj}_blocks"] = blocks.unflatten(-1, (-1, 16))  # gpt-oss: [E, N, K/32, 16]
            tensors[f"{prefix}.{proj}_scales"] = scales
            values = mxfp4.dequantize(blocks, scales)
            for e in experts:
                if proj == "down_proj":
                    reference[f"{prefix}.{e}.down_proj.weight"] = values[e]
                else:
                    g, u = values[e].chunk(2)
                    reference[f"{prefix}.{e}.gate_proj.weight"], reference[f"{prefix}.{e}.up_proj.weight"] = (
                        g,
                        u,
                    )
    save_file(tensors, str(folder / "model.safetensors"))
    model = hf_model(folder, F32, CPU)
    names = _quantized(model)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(cfg.num_layers)]  # experts only
    plain = build_model(cfg, F32, CPU)
    plain.load_weights(reference.items())
    assert rel_err(logits(model)[0], logits(plain)[0]) < 1e-5


# ------------------------------------------------------------------ the embedded GGUF model


@pytest.fixture(scope="module")
def smollm2() -> tuple[CausalLM, CausalLM]:
    native, _, _ = load_model(None, F32, CPU, quantization="gguf")
    plain, _, _ = load_model(None, F32, CPU)
    return native, plain


def test_gguf_blocks_match_the_dequantized_model(smollm2: tuple[CausalLM, CausalLM]) -> None:
    native, plain = smollm2
    names = _quantized(native)
    assert len(names) == 4 * native.config.num_layers  # qkv, o, gate_up and down of every layer
    err = rel_err(logits(native)[0], logits(plain)[0])
    assert err < 1e-4, err


def test_gguf_linear_weights_stay_in_their_blocks(smollm2: tuple[CausalLM, CausalLM]) -> None:
    native, plain = smollm2

    def linear_bytes(model: nn.Module) -> int:  # the decoder layers' (the embedding's blocks aside)
        layers = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if "layers." in n]
        blocks = sum(t.nbytes for n, t in layers if n.rsplit(".", 1)[-1].startswith("gguf_"))
        return blocks + sum(t.nbytes for n, t in layers if n.endswith("proj.weight"))

    ratio = linear_bytes(native) / linear_bytes(plain)
    # Q4_1: 20 bytes per 32 weights against float32's 128 (bfloat16's 64: 0.3125)
    assert ratio < 20 / 128 * 1.05, ratio


# token_embd.weight: Q8_0, 49152 x 576 values at 34 bytes a block of 32
SMOLLM2_EMBEDDING_BYTES = 30_081_024


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *module.buffers(recurse=False)]


def test_gguf_embedding_and_tied_head_stay_in_their_q8_0_blocks(smollm2: tuple[CausalLM, CausalLM]) -> None:
    native, plain = smollm2
    embed, head = native.model.embed_tokens, native.lm_head
    assert isinstance(embed.method, GGUFVocabMethod) and embed.method.ggml_type == "Q8_0"
    assert sum(t.nbytes for t in _own_tensors(embed)) == SMOLLM2_EMBEDDING_BYTES  # the file's bytes
    assert head.tied_to == (embed,) and not _own_tensors(head)  # the tied head reads the same blocks
    ids = torch.tensor([0, 504, 3575, 49151])
    assert torch.equal(embed(ids), plain.model.embed_tokens(ids))
    assert torch.equal(embed.dequantize(), plain.model.embed_tokens.weight)

    def weights(model: nn.Module) -> list[torch.Tensor]:  # (not the rotary tables)
        named = [*model.named_parameters(), *model.named_buffers()]
        return [t for n, t in named if not n.endswith(("rotary.cos", "rotary.sin"))]

    # against the dequantized model's values held in bf16: the file's own size, 0.359x (0.457x while the
    # embedding was dequantized)
    ratio = sum(t.nbytes for t in weights(native)) / (2 * sum(t.numel() for t in weights(plain)))
    assert ratio <= 0.37, ratio


def _greedy(model: CausalLM, prompt: list[int], steps: int) -> list[int]:
    runner = make_runner(model, num_pages=8, page_size=4, attention_backend="torch")
    seq = Sequence(list(prompt), SamplingParams())
    out = runner.run([(seq, len(prompt))])
    for _ in range(steps):
        seq.output_token_ids.append(int(out[0].argmax()))
        out = runner.run([(seq, 1)])
    return seq.output_token_ids


def test_gguf_blocks_decode_the_dequantized_model_s_greedy_tokens(smollm2: tuple[CausalLM, CausalLM]) -> None:
    native, plain = smollm2
    prompt = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    assert _greedy(native, prompt, 6) == _greedy(plain, prompt, 6)


def test_quantized_model_in_the_engine_through_padded_graphs(folders: dict[str, Path]) -> None:
    settings = dict(device="cpu", load_format="dummy", emulate_graphs_on_cpu=True,
                    piecewise_cuda_graph_tokens=(8, 32))  # fmt: skip
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    with LLM(str(folders["qwen3-moe"]), quantization="mxfp4", **settings) as llm:
        got = [o.token_ids for o in llm.generate(prompts, [params, params])]
        graphs = llm.stats()["graphs"]
    assert graphs["padded_tokens"] > 0 and not graphs["eager_fallbacks"], graphs
    eager = LLM(str(folders["qwen3-moe"]), quantization="mxfp4", device="cpu", load_format="dummy")
    assert got == [o.token_ids for o in eager.generate(prompts, [params, params])]


def test_gguf_flag_refuses_safetensors_quantizations_of_a_gguf_file() -> None:
    with pytest.raises(ValueError, match="GGUF file is served in its own formats"):
        load_model(None, F32, CPU, quantization="fp8")
