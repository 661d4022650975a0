"""The embedded SmolLM2-135M end to end on CPU: loading, tokenizer, generation, sampling, CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.loader.gguf_file import GGUFFile, unpermute
from tessera.loader.model_loader import default_model_path

from .runner_driver import make_runner

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu")


def _logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    runner = make_runner(llm.model, num_pages=8)
    return runner.run([(Sequence(ids, SamplingParams()), len(ids))])[0]


def test_smollm2_knows_the_capital_of_france(llm: LLM) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4))[0]
    assert out.text.startswith(" Paris"), out.text
    assert out.prompt_token_ids == llm.tokenizer.encode(PROMPT)
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_real_weights_match_hf_transformers(llm: LLM) -> None:
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(**llm.model_config.to_hf())
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(dict(GGUFFile(default_model_path()).weights()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = llm.tokenizer.encode("Piecewise CUDA graphs replay the pieces between attention calls.")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    got = _logits(llm, ids)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_unpermute_inverts_llama_cpp_permute() -> None:
    heads, w = 3, torch.randn(3 * 8, 5)
    permuted = w.reshape(heads, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's convert script
    torch.testing.assert_close(unpermute(permuted, heads), w)


def test_batch_and_chunked_prefill_give_the_same_tokens(llm: LLM) -> None:
    prompts = [PROMPT, "Water boils at", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=6)
    batched = [o.token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate(p, params)[0].token_ids for p in prompts]
    assert batched == alone
    config = llm.scheduler.config
    try:  # prompts run in chunks of 3 tokens, partly over prefixes cached by the runs above
        llm.scheduler.config = dataclasses.replace(config, chunked_prefill_size=3, max_num_batched_tokens=4)
        chunked = [o.token_ids for o in llm.generate(prompts, params)]
    finally:
        llm.scheduler.config = config
    assert chunked == batched


def test_sampling_is_seeded_and_top_k_1_is_greedy(llm: LLM) -> None:
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    first, again = (llm.generate(PROMPT, sampled)[0].token_ids for _ in range(2))
    other = llm.generate(PROMPT, dataclasses.replace(sampled, seed=8))[0].token_ids
    assert first == again and first != other
    greedy = llm.generate(PROMPT, SamplingParams(max_tokens=8))[0].token_ids
    top1 = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.7, top_k=1, seed=3))[0]
    assert top1.token_ids == greedy


def test_stop_strings_logprobs_and_eos(llm: LLM) -> None:
    out = llm.generate(PROMPT, SamplingParams(max_tokens=20, stop=(".",), logprobs=True, top_logprobs=3))[0]
    assert out.finish_reason == "stop" and out.text == " Paris"
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    assert all(lp <= 0 for lp in out.logprobs)
    # greedy: each token is its own most likely alternative, with the same log-probability
    assert out.top_logprobs is not None and len(out.top_logprobs) == len(out.token_ids)
    for token, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert len(top) == 3 and top[0][0] == token and abs(top[0][1] - lp) < 1e-5
    chat = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(max_tokens=64))
    assert chat.finish_reason == "stop" and chat.text  # ended by <|im_end|>, which is not in the text
    assert llm.model_config.eos_token_ids[0] not in chat.token_ids


def test_tokenizer_from_gguf(llm: LLM) -> None:
    tok = llm.tokenizer
    for text in ["Hello, world!", "12345 apples", "naïve café — ünïcödé", "  two  spaces\nnewline"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")]
    assert len(tok.encode("123")) == 3  # SmolLM2 splits digits one by one
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")


def test_bad_requests_are_refused_clearly(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="empty prompt"):
        llm.generate("")
    with pytest.raises(ValueError, match="2 prompts but 1 sampling params"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_hf_folder_and_gguf_give_the_same_logits(llm: LLM, tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    weights = {k: v.contiguous() for k, v in GGUFFile(default_model_path()).weights()}
    safetensors.save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(llm.model_config.to_hf()))
    llm.tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    from_folder = LLM(tmp_path, device="cpu")
    ids = llm.tokenizer.encode(PROMPT)
    assert from_folder.tokenizer.encode(PROMPT) == ids
    torch.testing.assert_close(_logits(from_folder, ids), _logits(llm, ids), rtol=0, atol=0)


def test_cli_generate_json() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tessera",
            "generate",
            "--prompt",
            PROMPT,
            "--prompt",
            "2 + 2 =",
            "--max-tokens",
            "3",
            "--json",
            "--raw",  # a plain continuation, not the chat template's answer
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in records] == [PROMPT, "2 + 2 ="]
    assert records[0]["text"].startswith(" Paris")
    assert {"text", "token_ids", "prompt_token_ids", "graph_stats"} <= set(records[0])
    assert "running eagerly on the CPU" in done.stderr


PROMPTS = [
    PROMPT,
    "Water boils at",
    "List three primary colors:",
    "Write one sentence about graphs that are captured once and replayed many times on a GPU.",
]


def test_piecewise_graphs_give_the_same_tokens_as_eager(llm: LLM) -> None:
    pcg = LLM(device="cpu", emulate_graphs_on_cpu=True, piecewise_cuda_graph_tokens=(4, 8, 16))
    params = SamplingParams(max_tokens=6)
    assert [o.token_ids for o in pcg.generate(PROMPTS, params)] == [
        o.token_ids for o in llm.generate(PROMPTS, params)
    ]
    alone = pcg.generate(PROMPT, params)[0]  # a 5-token prefill replays the 8-token graphs
    assert alone.token_ids == llm.generate(PROMPT, params)[0].token_ids
    stats = pcg.stats()["graphs"]
    # no full graphs: on a CPU attention runs on the torch backend, which they cannot capture
    assert set(stats["replays"]) == {"piecewise"}
    assert set(stats["replays"]["piecewise"]) == {"4", "8"}  # decode steps of <= 4 sequences pad to 4
    assert stats["eager_fallbacks"] == {"oversize": 1}  # the 4 prompts together: 38 tokens > 16
    assert stats["padded_tokens"] > 0
    eager = llm.stats()["graphs"]
    assert not eager["replays"] and eager["eager_fallbacks"]["disabled"] == llm.steps


def test_requests_beyond_the_kv_cache_are_preempted_and_every_page_comes_back(llm: LLM) -> None:
    small = LLM(device="cpu", cpu_kv_tokens=64)  # 4 pages of 16 tokens: requests must take turns
    capacity = small.stats()["pages_free"]
    params = SamplingParams(max_tokens=24)
    outs = small.generate(PROMPTS, params)
    stats = small.stats()
    assert stats["preemptions"] >= 1  # recomputed, nothing lost:
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate(PROMPTS, params)]
    assert stats["pages_cached"] > 0 and stats["pages_free"] + stats["pages_cached"] == capacity
    assert stats["pages_evictable"] == stats["pages_cached"]  # no request holds them any more
    with pytest.raises(ValueError, match=r"needs \d+ KV tokens"):
        small.generate(PROMPT, SamplingParams(max_tokens=100))
    stats = small.stats()
    assert stats["pages_free"] + stats["pages_cached"] == capacity


def test_dummy_weights_from_a_config_folder(tmp_path: Path) -> None:
    from tessera.loader.hf import read_config

    llama = read_config(Path(__file__).parent.parent / "benchmarks/configs/llama3-8b")
    shape = (llama.num_layers, llama.hidden_size, llama.num_heads, llama.num_kv_heads, llama.vocab_size)
    assert shape == (32, 4096, 32, 8, 128256) and llama.rope_theta == 500000.0
    tiny = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(tiny))
    dummy = LLM(tmp_path, device="cpu", load_format="dummy")
    assert all(p.abs().sum() > 0 for p in dummy.model.parameters())
    out = dummy.generate(PROMPT, SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_context_length_and_chat_template_overrides(tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}")
    small = LLM(device="cpu", context_length=16, chat_template=str(template), cpu_kv_tokens=128)
    assert small.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<<hi>>"
    with pytest.raises(ValueError, match="the model's context is 16"):
        small.generate(" ".join(["word"] * 20), SamplingParams(max_tokens=2))
    out = small.generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.prompt_token_ids) + len(out.token_ids) == 16
    with pytest.raises(ValueError, match="exceeds the model's 8192"):
        LLM(device="cpu", context_length=10**6)
