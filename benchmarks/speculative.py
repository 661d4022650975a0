"""Speculative decoding against plain decoding, same card, same run (`python -m benchmarks.speculative`).

For each workload and batch size, B requests run together through `Engine.step()` on an engine without
speculation and on one per proposer; reported per run: decode tokens/s (tokens after each request's
first, over the time from the first request's first token to the last request's end), the mean time
per output token of a request, the acceptance histogram and mean acceptance length, and how many
completions differ from plain decoding's (greedy; bfloat16 batches of another shape may round
differently, so this is counted, not asserted).

Workloads (default SmolLM2-135M-Instruct, chat-templated, greedy; `--model benchmarks/configs/llama3-8b
--load-format dummy --proposers plain eagle-random eagle-random-k1 eagle-random-hot32k` measures EAGLE's
overhead on Llama-3-8B's shapes, at K = 3, K = 1, and K = 3 over a hot vocabulary):
- repeat: "repeat this text" over GSM8K questions, an output that copies its input (NGRAM's case);
- gsm8k: GSM8K questions answered step by step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_json
from benchmarks.eval_gsm8k import load_questions
from tessera.engine.llm import LLM
from tessera.engine.sampling import SamplingParams

PROPOSERS: dict[str, dict[str, Any]] = {
    "plain": {},
    "ngram": {"speculative_algorithm": "NGRAM", "speculative_num_steps": 4},
    # at batch 1 a verify of 9 tokens costs about what one of 5 does, and a copied text matches long
    "ngram-8": {"speculative_algorithm": "NGRAM", "speculative_num_steps": 8},
    "self-draft-8": {
        "speculative_algorithm": "STANDALONE", "speculative_draft_layers": 8, "speculative_num_steps": 3,
    },
    # a seeded random EAGLE head for the target (no public head is here): acceptance ~0, so this
    # measures what speculation costs
    "eagle-random": {"speculative_algorithm": "EAGLE", "speculative_num_steps": 3},
    "eagle-random-k1": {"speculative_algorithm": "EAGLE", "speculative_num_steps": 1},
    # drafting from a hot vocabulary of 32,768 tokens (FR-Spec's size; with a random head which ones
    # changes nothing of the cost): a quarter of Llama-3's lm_head read a draft step
    "eagle-random-hot32k": {"speculative_algorithm": "EAGLE", "speculative_num_steps": 3, "hot_vocab": 32768},
    "eagle-random-hot32k-k1": {
        "speculative_algorithm": "EAGLE", "speculative_num_steps": 1, "hot_vocab": 32768,
    },
}  # fmt: skip


def prompts(llm: LLM, workload: str, n: int) -> list[list[int]]:
    rows = load_questions()[:n]
    if workload == "repeat":
        asks = [f"Repeat the following text exactly, word for word:\n\n{r['question']}" for r in rows]
    else:
        asks = [f"Answer step by step.\n\n{r['question']}" for r in rows]
    tok = llm.tokenizer
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": a}])) for a in asks]


def run(llm: LLM, ids: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """All of `ids` together; per-request first-token and finish times from the step loop."""
    params = SamplingParams(max_tokens=max_tokens)
    stats = llm.stats()
    before, steps_before, seconds_before = list(stats["spec_accepted"]), stats["steps"], stats["step_seconds"]
    seqs = [llm.add(p, params) for p in ids]
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    while llm.has_work:
        llm.step()
        now = time.perf_counter()
        for seq in seqs:
            if seq.output_token_ids and seq.id not in first:
                first[seq.id] = now
            if seq.finished and seq.id not in done:
                done[seq.id] = now
    decoded = sum(len(s.output_token_ids) - 1 for s in seqs)
    span = max(done.values()) - min(first.values())
    tpot = [
        (done[s.id] - first[s.id]) / (len(s.output_token_ids) - 1)
        for s in seqs
        if len(s.output_token_ids) > 1
    ]
    stats = llm.stats()
    accepted = [a - b for a, b in zip(stats["spec_accepted"], before, strict=True)]
    verifies = sum(accepted)
    steps = stats["steps"] - steps_before
    return {
        "decode_tok_s": decoded / span if span > 0 else 0.0,
        "mean_tpot_ms": 1e3 * sum(tpot) / max(len(tpot), 1),
        "output_tokens": decoded + len(seqs),
        "accepted_histogram": accepted,
        "acceptance_length": (verifies + sum(k * n for k, n in enumerate(accepted))) / verifies
        if verifies
        else None,
        # the host's milliseconds a step by phase (`Engine.step`): propose includes waiting for the
        # draft chain, sample waiting for the target's forward
        "steps": steps,
        "step_ms": {
            k: round(1e3 * (v - seconds_before[k]) / max(steps, 1), 3)
            for k, v in stats["step_seconds"].items()
        },
        "outputs": [list(s.output_token_ids) for s in seqs],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    default = ["plain", "ngram", "ngram-8", "self-draft-8"]
    p.add_argument("--proposers", nargs="+", default=default, choices=list(PROPOSERS))
    p.add_argument("--workloads", nargs="+", default=["repeat", "gsm8k"], choices=["repeat", "gsm8k"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("NOTE: no GPU: these numbers are CPU numbers, not the benchmark's")
    report: dict[str, Any] = {"benchmark": "speculative", "max_tokens": args.max_tokens, "runs": []}
    plain: dict[tuple[str, int], dict[str, Any]] = {}
    for name in ["plain", *[n for n in args.proposers if n != "plain"]]:
        t = time.perf_counter()
        spec = dict(PROPOSERS[name])
        if spec.get("speculative_algorithm") == "EAGLE":
            head = _random_head(args.model)
            spec["speculative_draft_model_path"] = str(head)
            if "hot_vocab" in spec:
                torch.save(torch.arange(spec.pop("hot_vocab")), head / "token_map.pt")
                spec["speculative_token_map"] = str(head / "token_map.pt")
        llm = LLM(args.model, load_format=args.load_format, **spec)
        startup = time.perf_counter() - t
        for workload in args.workloads:
            for bs in args.batch_sizes:
                ids = prompts(llm, workload, bs)
                run(llm, ids[: min(bs, 2)], 16)  # warm-up
                row = {
                    "proposer": name,
                    "workload": workload,
                    "batch_size": bs,
                    "startup_s": round(startup, 2),
                }
                row |= run(llm, ids, args.max_tokens)
                base = plain.setdefault((workload, bs), row)
                row["completions_differing_from_plain"] = sum(
                    a != b for a, b in zip(base["outputs"], row["outputs"], strict=True)
                )
                row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
                report["runs"].append({k: v for k, v in row.items() if k != "outputs"})
                print(_line(row), flush=True)
                if args.out:
                    write_json(args.out, report)
        del llm  # (the next engine collects its reference cycles before it loads)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _random_head(model: str | None) -> Path:
    from tessera.loader.model_loader import default_model_path
    from tessera.testing.eagle_checkpoint import save_random_eagle_head

    if model is None or Path(model).suffix == ".gguf":
        from tessera.loader.gguf_file import GGUFFile

        target = GGUFFile(Path(model) if model else default_model_path()).config
    else:
        target = json.loads((Path(model) / "config.json").read_text())
    folder = Path(tempfile.mkdtemp(prefix="eagle-head-"))
    save_random_eagle_head(folder, target, seed=0)
    return folder


def _line(r: dict[str, Any]) -> str:
    return (f"{r['proposer']:<13} {r['workload']:<7} bs={r['batch_size']:<3} {r['decode_tok_s']:9.1f} tok/s "
            f"({r['speedup']:.2f}x)  tpot {r['mean_tpot_ms']:.2f} ms  "
            f"accept len {r['acceptance_length'] or 0:.2f}  "
            f"differ {r['completions_differing_from_plain']}/{r['batch_size']}")  # fmt: skip


if __name__ == "__main__":
    main()
