"""The `tessera` command line: version, help, flag spellings, one-line errors before anything loads, and
`generate` chat-templating by default (one end-to-end run on the embedded model)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import tessera
from tessera.cli import build_parser, check_device, engine_config, main, served_model_name
from tessera.engine.config import EngineConfig


def _config(*argv: str) -> EngineConfig:
    return engine_config(build_parser().parse_args(list(argv)))


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"tessera {tessera.__version__}\n"


@pytest.mark.parametrize("argv", [["bench"], ["bench", "serve"]])
def test_bench_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert "serve" in _help(capsys, *argv)


def test_help_shows_defaults_but_not_the_api_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    generate = _help(capsys, "generate")
    assert "(default: 64)" in generate and "(default: 0.8)" in generate and "(default: info)" in generate
    monkeypatch.setenv("TESSERA_API_KEY", "sk-not-for-help")
    serve = _help(capsys, "serve")
    assert "(default: 30000)" in serve and "sk-not-for-help" not in serve


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_the_model_is_positional_or_a_flag(command: str) -> None:
    prompt = ["--prompt", "x"] if command == "generate" else []
    positional = _config(command, "m.gguf", *prompt, "--page-size", "32")
    assert positional == _config(command, "--model", "m.gguf", *prompt, "--page-size", "32")
    assert positional == EngineConfig.create("m.gguf", page_size=32)


def test_engine_flags() -> None:
    assert _config("serve", "--mem-fraction-static", "0.5").mem_fraction == 0.5
    assert _config("serve", "--mem-fraction", "0.5").mem_fraction == 0.5  # the first spelling still works
    config = _config("serve", "--context-length", "4096", "--chat-template", "t.jinja")
    assert config.context_length == 4096 and config.chat_template == "t.jinja"


def test_chat_is_the_default_and_raw_turns_it_off() -> None:
    def chat(*flags: str) -> bool:
        return build_parser().parse_args(["generate", "--prompt", "x", *flags]).chat

    assert chat() and chat("--chat")
    assert not chat("--raw") and not chat("--no-chat")


def test_served_model_name() -> None:
    def name(*argv: str) -> str:
        args = build_parser().parse_args(["serve", *argv])
        return served_model_name(args, engine_config(args))

    assert name() == "SmolLM2-135M-Instruct"
    assert name("models/Qwen3-0.6B/") == "Qwen3-0.6B"
    assert name("dir/m.gguf") == "m"
    assert name("m.gguf", "--served-model-name", "mine") == "mine"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "/no/such/model.gguf", "--prompt", "x"], "model /no/such/model.gguf does not exist"),
        (["generate", "--model", "/no/such/dir", "--prompt", "x"], "model /no/such/dir does not exist"),
        (["serve", "/no/such/model.gguf"], "model /no/such/model.gguf does not exist"),
        (["serve", "a.gguf", "--model", "b.gguf"], "two models given"),
        (["serve", "--device", "cuda"], "sees no GPU"),
        (["generate", "--device", "cuda:0", "--prompt", "x"], "sees no GPU"),
        (["serve", "--device", "gpu"], "unknown device 'gpu'"),
        (["serve", "--context-length", "0"], "context_length must be >= 1"),
        (["serve", "--chat-template", "/no/such.jinja"], "chat template /no/such.jinja is not a file"),
        (["serve", "--mem-fraction-static", "1.5"], "mem_fraction must be in (0, 1)"),
    ],
)
def test_bad_inputs_are_one_line_errors_before_loading(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only torch, on any machine
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tessera {argv[0]}: error: ") and message in err
    assert err.count("\n") == 1


def test_a_gpu_index_beyond_the_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_device("cuda:0")
    with pytest.raises(ValueError, match="there are 1 GPUs"):
        check_device("cuda:1")


def test_generate_answers_in_the_chat_template_by_default() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tessera", "generate", "--prompt", "What is the capital of France?",
         "--max-tokens", "6", "--device", "cpu", "--log-level", "warning"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "Paris" in done.stdout and done.stdout.count("\n") == 1  # the answer alone: no template
    assert "<|im_" not in done.stdout and "assistant" not in done.stdout
    assert "INFO" not in done.stderr and "running eagerly on the CPU" in done.stderr  # --log-level warning
