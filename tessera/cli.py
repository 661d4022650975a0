"""The `tessera` command line (`python -m tessera` works the same)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tessera.engine.config import DTYPES, LOAD_FORMATS, EngineConfig, RunnerConfig, SchedulerConfig


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text offline (default model: embedded SmolLM2-135M)")
    p.add_argument("--model", default=None, help="a .gguf file or an HF model folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="[-2, 2]; once a token was output")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="[-2, 2]; per time it is output")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 0 (1: off); prompt and output")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_runner_flags(p)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    p.add_argument(
        "model", nargs="?", default=None, help="a .gguf file or an HF model folder (default: SmolLM2)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("TESSERA_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 routes (default: $TESSERA_API_KEY; none: open)",
    )
    add_runner_flags(p)


def add_runner_flags(p: argparse.ArgumentParser) -> None:
    """Engine flags, spelled as SGLang spells them; defaults come from the config classes."""
    e, s, r = EngineConfig(), SchedulerConfig(), RunnerConfig()
    p.add_argument("--dtype", default=None, choices=list(DTYPES))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--load-format", choices=list(LOAD_FORMATS), default=e.load_format,
                   help="dummy: random weights for the folder's config.json (benchmarks)")  # fmt: skip
    g = p.add_argument_group("model runner")
    g.add_argument("--chunked-prefill-size", type=int, default=s.chunked_prefill_size)
    g.add_argument("--page-size", type=int, default=e.page_size)
    g.add_argument("--mem-fraction", type=float, default=e.mem_fraction,
                   help="of free GPU memory, for the KV cache")  # fmt: skip
    g.add_argument("--disable-piecewise-cuda-graph", action="store_true")
    g.add_argument(
        "--piecewise-cuda-graph-max-tokens",
        type=int,
        default=None,
        help="largest captured token count (default: --chunked-prefill-size)",
    )
    g.add_argument(
        "--piecewise-cuda-graph-tokens", type=int, nargs="+", default=None, help="explicit capture sizes"
    )
    g.add_argument("--piecewise-cuda-graph-strategy", choices=["breakable", "compile"],
                   default=r.piecewise_cuda_graph_strategy)  # fmt: skip
    g.add_argument("--piecewise-cuda-graph-compiler", choices=["eager", "inductor"],
                   default=r.piecewise_cuda_graph_compiler)  # fmt: skip
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget of one forward, decodes included (default: --chunked-prefill-size, so every "
        "batch fits the piecewise graphs' range)",
    )
    g.add_argument("--max-running-requests", type=int, default=s.max_running_requests)
    g.add_argument("--disable-radix-cache", action="store_true", help="no prefix sharing between requests")
    g.add_argument(
        "--disable-cuda-graph", action="store_true", help="no full CUDA graphs (decode, small extend batches)"
    )
    g.add_argument("--cuda-graph-max-bs", type=int, default=r.cuda_graph_max_bs,
                   help="largest decode batch captured")  # fmt: skip
    g.add_argument(
        "--extend-cuda-graph-max-tokens",
        type=int,
        default=r.extend_cuda_graph_max_tokens,
        help="extend and mixed batches of at most this many tokens (and --extend-cuda-graph-max-seqs "
        "sequences) run as one full CUDA graph, attention captured; 0: always piecewise",
    )
    g.add_argument("--extend-cuda-graph-max-seqs", type=int, default=r.extend_cuda_graph_max_seqs)
    g.add_argument(
        "--attention-backend",
        choices=["auto", "torch", "triton"],
        default=r.attention_backend,
        help="auto: triton on a GPU, torch on a CPU",
    )
    g.add_argument(
        "--moe-runner-backend",
        choices=["auto", "triton", "grouped_mm"],
        default=r.moe_runner_backend,
        help="MoE experts: auto = on a GPU the Triton grouped GEMMs, torch._grouped_mm for large batches on "
        "Hopper (reference loop on a CPU); triton, grouped_mm = always that one",
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The one place flags become an `EngineConfig` (generate and serve alike): each flag is named after
    the setting it sets."""
    names = EngineConfig.setting_names()
    settings = {k: v for k, v in vars(args).items() if k in names and k != "model"}
    settings["piecewise_cuda_graph_tokens"] = tuple(args.piecewise_cuda_graph_tokens or ()) or None
    return EngineConfig.create(None if args.model is None else str(args.model), **settings)


def serve(args: argparse.Namespace) -> None:
    from pathlib import Path

    import uvicorn

    from tessera.server.api import create_app
    from tessera.server.engine_loop import AsyncEngine

    engine = AsyncEngine.start(engine_config(args))  # its own process (engine_worker.py)
    name = Path(args.model).stem if args.model else "SmolLM2-135M-Instruct"
    try:
        # NOTE: keep-alive longer than clients' usual pool expiry (httpx: 5 s), so a pooled connection
        # is never closed by the server just as a client reuses it (a spurious ReadError)
        uvicorn.run(create_app(engine, name, args.api_key), host=args.host, port=args.port, log_level="info",
                    timeout_keep_alive=30)  # fmt: skip
    finally:
        engine.shutdown()


def generate(args: argparse.Namespace) -> None:
    from tessera.engine.llm import LLM
    from tessera.engine.sampling import SamplingParams

    llm = LLM(config=engine_config(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=tuple(args.stop),
        logprobs=args.json,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )
    prompts = args.prompt
    if args.chat:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    for original, out in zip(args.prompt, llm.generate(prompts, params), strict=True):
        if args.json:
            record = {
                "prompt": original,
                "text": out.text,
                "token_ids": out.token_ids,
                "prompt_token_ids": out.prompt_token_ids,
                "finish_reason": out.finish_reason,
                "logprobs": out.logprobs,
                "graph_stats": llm.runner.graph_stats(),
            }
            print(json.dumps(record))
        else:
            print(f"{original}{out.text}" if not args.chat else out.text)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="tessera", description="piecewise-CUDA-graph LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _serve_parser(sub)
    bench = sub.add_parser(
        "bench",
        help="the serving benchmark (the other benchmarks: python -m benchmarks.NAME in a source checkout)",
    )
    bench.add_argument("which", choices=["serve"], help="`tessera bench serve --help` lists its flags")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "bench":
        from tessera.bench import serve as bench_serve

        bench_serve.main(args.bench_args)
        return 0
    try:
        (generate if args.command == "generate" else serve)(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tessera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
