"""The `tessera` command line (`python -m tessera` works the same)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tessera import __version__
from tessera.engine.config import (
    DTYPES,
    LOAD_FORMATS,
    QUANTIZATIONS,
    SPECULATIVE_ALGORITHMS,
    EngineConfig,
    RunnerConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from tessera.engine.torchrun import check_parallel, torchrun_config, torchrun_rank, torchrun_tp

if TYPE_CHECKING:
    from tessera.engine.llm import RequestOutput
    from tessera.engine.sampling import SamplingParams

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default model, as the server names it
LOG_LEVELS = ("debug", "info", "warning", "error")
logger = logging.getLogger("tessera")


class HelpFormatter(argparse.HelpFormatter):
    """`--help` shows each flag's default where it says something: not for switches, None or [], nor
    where the help words the default itself (`--api-key`'s value would be a secret from the environment).
    NOTE: not argparse's ArgumentDefaultsHelpFormatter, which skips every flag without a help text."""

    def _format_action(self, action: argparse.Action) -> str:
        worded = "default" in (action.help or "")
        if action.nargs != 0 and action.default not in (None, [], argparse.SUPPRESS) and not worded:
            action = copy.copy(action)  # the parser's own action keeps its help
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
        return super()._format_action(action)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", default=None,
        help=f"a .gguf file or an HF model folder (default: the embedded {DEFAULT_MODEL_NAME})",
    )  # fmt: skip
    p.add_argument("--model", dest="model_flag", metavar="MODEL", default=None, help="the model, as a flag")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help=f"generate text offline (default model: the embedded {DEFAULT_MODEL_NAME})",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    _model_flags(p)
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
    # NOTE: chat-templated by default: a chat model given a bare prompt runs on past its answer
    p.add_argument(
        "--no-chat", "--raw", dest="chat", action="store_false",
        help="send each prompt as it is (default: in the model's chat template, if it has one)",
    )  # fmt: skip
    p.add_argument("--chat", dest="chat", action="store_true", help="the default, kept for old commands")
    p.set_defaults(chat=True)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_runner_flags(p)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server", formatter_class=HelpFormatter)
    _model_flags(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model's name in the API (default: its file name less .gguf, or its folder's name; "
        f"{DEFAULT_MODEL_NAME} for the embedded model)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("TESSERA_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 routes (default: $TESSERA_API_KEY; none: open)",
    )
    add_runner_flags(p)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="the serving benchmark (the other benchmarks: python -m benchmarks.NAME in a source checkout)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("which", choices=["serve"], help="`tessera bench serve --help` lists its flags")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def add_runner_flags(p: argparse.ArgumentParser) -> None:
    """Engine flags, spelled as SGLang spells them; defaults come from the config classes."""
    e, s, r = EngineConfig(), SchedulerConfig(), RunnerConfig()
    p.add_argument(
        "--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on a GPU, float32 on a CPU"
    )
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--load-format", choices=list(LOAD_FORMATS), default=e.load_format,
                   help="dummy: random weights for the folder's config.json (benchmarks)")  # fmt: skip
    p.add_argument(
        "--quantization", default=None, choices=list(QUANTIZATIONS),
        help="fp8 (per-channel weights, per-token activations), fp8_block (128x128 blocks) or mxfp4: "
        "quantize an unquantized checkpoint at load; gguf: keep a GGUF file's tensors in their blocks; none: "
        "no quantization (a GGUF file dequantized at load, its default). FP8 and MXFP4 checkpoints are "
        "served in their format without it",
    )  # fmt: skip
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens of prompt and output together (default: the model's)")  # fmt: skip
    p.add_argument("--chat-template", default=None, metavar="PATH",
                   help="a jinja file to use instead of the model's chat template")  # fmt: skip
    g = p.add_argument_group("model runner")
    g.add_argument("--chunked-prefill-size", type=int, default=s.chunked_prefill_size)
    g.add_argument("--page-size", type=int, default=e.page_size)
    g.add_argument("--mem-fraction-static", "--mem-fraction", dest="mem_fraction", type=float,
                   default=e.mem_fraction, help="of free GPU memory, for the KV cache")  # fmt: skip
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
    _parallel_flags(p)
    _speculative_flags(p)


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    e = EngineConfig()
    g = p.add_argument_group("tensor parallelism")
    g.add_argument(
        "--tp", "--tp-size", "--tensor-parallel-size", dest="tensor_parallel_size", type=int,
        default=e.tensor_parallel_size,
        help="ranks (GPUs) sharing each layer; rank 0 runs here, the others in worker processes (torchrun: "
        "its WORLD_SIZE)",
    )  # fmt: skip
    g.add_argument(
        "--ep", "--ep-size", "--expert-parallel-size", dest="expert_parallel_size", type=int,
        default=e.expert_parallel_size,
        help="1: every rank holds a slice of every expert; = --tp: experts spread over the ranks",
    )  # fmt: skip
    g.add_argument("--dist-timeout", type=float, default=e.dist_timeout,
                   help="seconds a rank may take to answer before it is reported as failed")  # fmt: skip
    g.add_argument("--all-reduce-placement", choices=["inside", "split"], default=e.all_reduce_placement,
                   help="the model's all-reduces inside the CUDA graph pieces, or as graph boundaries run "
                   "eagerly")  # fmt: skip


def _speculative_flags(p: argparse.ArgumentParser) -> None:
    spec = SpeculativeConfig()
    g = p.add_argument_group("speculative decoding")
    g.add_argument(
        "--speculative-algorithm", type=str.upper, choices=list(SPECULATIVE_ALGORITHMS), default=None,
        help="NGRAM: drafts from the request's own tokens; STANDALONE: a draft model (or the target's first "
        "layers); EAGLE: an EAGLE head",
    )  # fmt: skip
    g.add_argument("--speculative-num-steps", type=int, default=None,
                   help="draft tokens per request and step (default: 3)")  # fmt: skip
    g.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="tokens verified per request and step: --speculative-num-steps + 1")  # fmt: skip
    g.add_argument(
        "--speculative-draft-model-path", default=None, metavar="PATH",
        help="STANDALONE: the draft model (sharing the target's vocabulary); EAGLE: the head",
    )  # fmt: skip
    g.add_argument(
        "--speculative-draft-layers", type=int, default=None, metavar="L",
        help="STANDALONE: draft with the target's own first L layers (no extra weights)",
    )  # fmt: skip
    g.add_argument(
        "--speculative-token-map", default=None, metavar="PATH",
        help="EAGLE: draft from these tokens only, a torch.save'd 1-D tensor of ids (e.g. the 32k most "
        "frequent: FR-Spec's freq_32768.pt); the head's LM head keeps only their rows",
    )  # fmt: skip
    g.add_argument("--speculative-ngram-min-match-window-size", type=int,
                   default=spec.speculative_ngram_min_match_window_size)  # fmt: skip
    g.add_argument("--speculative-ngram-max-match-window-size", type=int,
                   default=spec.speculative_ngram_max_match_window_size)  # fmt: skip


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The one place flags become an `EngineConfig` (generate and serve alike): each flag is named after
    the setting it sets."""
    names = EngineConfig.setting_names()
    settings = {k: v for k, v in vars(args).items() if k in names and k != "model"}
    settings["piecewise_cuda_graph_tokens"] = tuple(args.piecewise_cuda_graph_tokens or ()) or None
    # NOTE: before the config checks --ep against it: under torchrun `--tp` defaults to the world size
    settings["tensor_parallel_size"] = torchrun_tp(args.tensor_parallel_size)
    model = _model(args)
    return EngineConfig.create(None if model is None else str(model), **settings)


def _model(args: argparse.Namespace) -> str | None:
    """The model, given positionally (every command) or as `--model` (generate's first spelling)."""
    flag = getattr(args, "model_flag", None)
    if args.model is not None and flag is not None and args.model != flag:
        raise ValueError(f"two models given: {args.model} and --model {flag}")
    return args.model if args.model is not None else flag


def check_inputs(config: EngineConfig) -> None:
    """What would otherwise fail deep in loading (or in the server's engine process) as a traceback,
    checked before anything loads: the files named, and the device."""
    from tessera.loader.model_loader import default_model_path

    if config.model is None:
        default_model_path()  # raises FileNotFoundError saying how to install it
    elif not Path(config.model).exists():
        raise FileNotFoundError(f"model {config.model} does not exist (a .gguf file or an HF model folder)")
    if config.chat_template is not None and not Path(config.chat_template).is_file():
        raise FileNotFoundError(f"chat template {config.chat_template} is not a file")
    check_device(config.device)
    check_parallel(config)


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use (`--device cuda` on a CPU-only build)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: cuda, cuda:N or cpu") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device!r}: cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}, but this torch ({torch.__version__}) sees no GPU; try --device cpu"
        )
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}, but there are {torch.cuda.device_count()} GPUs")


def serve(args: argparse.Namespace, config: EngineConfig) -> None:
    import uvicorn

    from tessera.server.api import create_app
    from tessera.server.engine_loop import AsyncEngine

    name = served_model_name(args, config)
    engine = AsyncEngine.start(config)  # its own process (engine_worker.py)
    app = create_app(engine, name, args.api_key)
    # NOTE: keep-alive longer than clients' usual pool expiry (httpx: 5 s), so a pooled connection
    # is never closed by the server just as a client reuses it (a spurious ReadError). A Server of our
    # own, not uvicorn.run: the engine's death must be able to stop it.
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30)
    )

    def stop() -> None:  # the engine died and its requests have failed: drain (bounded), then exit
        server.config.timeout_graceful_shutdown = 10
        server.should_exit = True

    engine.on_death(stop)
    try:
        server.run()
    except KeyboardInterrupt:  # as uvicorn.run: a second Ctrl-C during shutdown
        pass
    finally:
        engine.shutdown()
    if engine.died:  # NOTE: a non-zero exit, so that a supervisor restarts the server
        logger.error("tessera serve: the engine process died (exit code %s); exiting", engine.exit_code)
        raise SystemExit(1)
    if not server.started:  # as uvicorn.run: e.g. the app's startup failed
        raise SystemExit(uvicorn.config.STARTUP_FAILURE)


def served_model_name(args: argparse.Namespace, config: EngineConfig) -> str:
    """The name requests give: `--served-model-name`, else the model's file name less `.gguf` or its
    folder's name (whole: `Qwen3-0.6B/` is no file with a suffix `.6B`)."""
    if args.served_model_name or config.model is None:
        return args.served_model_name or DEFAULT_MODEL_NAME
    path = Path(config.model)
    return path.stem if path.suffix == ".gguf" else path.name


def generate(args: argparse.Namespace, config: EngineConfig) -> None:
    from tessera.engine.llm import LLM

    with LLM(config=config) as llm:
        chat = args.chat and llm.tokenizer.chat_template is not None
        prompts = args.prompt
        if chat:
            logger.info("prompts go in the model's chat template (--raw: as they are)")
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        for original, out in zip(args.prompt, llm.generate(prompts, _sampling_params(args)), strict=True):
            if args.json:
                print(json.dumps(_record(original, out, llm.runner.graph_stats())))
            else:
                print(out.text if chat else f"{original}{out.text}")  # the answer alone, not the template


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    from tessera.engine.sampling import SamplingParams

    return SamplingParams(
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


def _record(prompt: str, out: RequestOutput, graph_stats: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "text": out.text,
        "token_ids": out.token_ids,
        "prompt_token_ids": out.prompt_token_ids,
        "finish_reason": out.finish_reason,
        "logprobs": out.logprobs,
        "graph_stats": graph_stats,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="piecewise-CUDA-graph LLM engine", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _serve_parser(sub)
    _bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "bench":
        from tessera.bench import serve as bench_serve

        bench_serve.main(args.bench_args)
        return 0
    try:
        config = torchrun_config(engine_config(args))  # every setting checked, then files and device
        check_inputs(config)
        rank = torchrun_rank()
        if rank is not None and rank > 0:  # torchrun's other ranks: serve rank 0's forwards
            from tessera.engine.parallel import serve_torchrun_worker

            serve_torchrun_worker(config)
            return 0
        (generate if args.command == "generate" else serve)(args, config)
    except (FileNotFoundError, ValueError) as exc:
        print(f"tessera {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
