"""Config, op registration, watchdog and platform branches of tessera.graphs."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tessera.graphs import (
    CaptureTimeoutError,
    ForwardContext,
    GraphConfig,
    PiecewiseGraphRunner,
    default_capture_sizes,
    forward_context,
    get_forward_context,
    hygiene,
    opaque_op,
    platform,
    split_op,
)
from tessera.graphs.watchdog import watchdog


def test_default_sizes_are_one_two_then_sglang_schedule() -> None:
    sizes = default_capture_sizes(8192)
    assert len(sizes) == 60
    assert sizes[:10] == [1, 2, 4, 8, 12, 16, 20, 24, 28, 32]
    assert sizes[10:12] == [48, 64] and 256 in sizes and 288 in sizes and 576 in sizes
    assert sizes[-3:] == [7168, 7680, 8192] and 4096 in sizes and 4608 in sizes
    assert default_capture_sizes(100)[-1] == 100  # the cap itself is always captured
    assert default_capture_sizes(2) == [1, 2] and default_capture_sizes(3) == [1, 2, 3]


def test_config_validates_and_normalises() -> None:
    assert GraphConfig(capture_sizes=[16, 4, 4, 8]).sizes == (4, 8, 16)
    assert GraphConfig(max_tokens=512).largest == 512
    with pytest.raises(ValueError, match="unknown strategy"):
        GraphConfig(strategy="full")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown compiler"):
        GraphConfig(compiler="tvm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 1"):
        GraphConfig(capture_sizes=[0, 4])


def test_forward_context_nests_and_validates() -> None:
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
    with forward_context(ForwardContext(8, 5)) as outer:
        with forward_context(ForwardContext(4, 4)):
            assert get_forward_context().num_tokens == 4
        assert get_forward_context() is outer and outer.num_padded == 3
    with pytest.raises(ValueError, match="raw_num_tokens"):
        ForwardContext(4, 5)


def test_split_op_registration_errors() -> None:
    with pytest.raises(ValueError, match="outputs must name parameters"):

        @split_op("tessera_test::bad_outputs", outputs=("nope",))
        def bad(x: torch.Tensor, out: torch.Tensor) -> None:
            out.copy_(x)

    @split_op("tessera_test::twice", outputs=("out",))
    def once(x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x)

    with pytest.raises(ValueError, match="already registered"):
        split_op("tessera_test::twice", outputs=("out",))(once.fn)


def test_split_op_zeroes_padded_rows_of_its_outputs_only() -> None:
    @split_op("tessera_test::fill", outputs=("out",), mutates=("cache",))
    def fill(x: torch.Tensor, out: torch.Tensor, cache: torch.Tensor) -> None:
        out.fill_(7.0)
        cache.fill_(3.0)

    x, out, cache = torch.ones(6, 2), torch.empty(6, 2), torch.empty(6, 2)
    with forward_context(ForwardContext(num_tokens=6, raw_num_tokens=4)):
        torch.ops.tessera_test.fill(x, out, cache)
    assert out[:4].eq(7).all() and out[4:].eq(0).all()
    assert cache.eq(3).all()  # not an output: never zeroed


def test_split_op_that_zeroes_its_padding_is_left_alone() -> None:
    # A (deliberately lying) op that declares it zeroes its padded rows: the runtime adds nothing, so
    # what the op wrote there stays. The toy attention and the engine's keep that promise (their tests).
    @split_op("tessera_test::fill_all", outputs=("out",), zeroes_padding=True)
    def fill_all(x: torch.Tensor, out: torch.Tensor) -> None:
        out.fill_(7.0)

    out = torch.empty(6, 2)
    with forward_context(ForwardContext(num_tokens=6, raw_num_tokens=4)):
        torch.ops.tessera_test.fill_all(torch.ones(6, 2), out)
    assert out.eq(7).all()


def test_toy_attention_zeroes_its_padded_rows() -> None:
    from tessera.testing.toy import toy_attention

    assert toy_attention.zeroes_padding
    qkv = torch.randn(6, 3, 2, 8)
    out = torch.full((6, 2, 8), float("nan"))
    with forward_context(ForwardContext(num_tokens=6, raw_num_tokens=4)):
        torch.ops.tessera_toy.attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], out, 0)
    assert out[:4].isfinite().all() and out[4:].eq(0).all()


# Dynamo cannot trace numpy round trips inside fullgraph=True; as an opaque op it never tries.
@opaque_op("tessera_test::np_tanh", fake=lambda x: torch.empty_like(x))
def np_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.tanh(x.detach().cpu().numpy())).to(x.device)


class _Opaque(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.tessera_test.np_tanh(self.proj(x)) * 2


@torch.no_grad()
def test_opaque_op_stays_inside_a_piece_under_fullgraph() -> None:
    model = _Opaque()
    runner = PiecewiseGraphRunner(model, GraphConfig(strategy="compile", capture_sizes=[8], progress=False))
    runner.capture([torch.randn(3, 4)])
    assert runner.report is not None and runner.report.num_pieces == 1
    x = torch.randn(5, 4)
    torch.testing.assert_close(runner(x), model(x))


def test_watchdog_interrupts_a_blocked_main_thread() -> None:
    t = time.perf_counter()
    expected = r"piece 3 at 64 tokens did not finish within 0\.3s"
    with pytest.raises(CaptureTimeoutError, match=expected), watchdog(0.3, lambda: "piece 3 at 64 tokens"):
        threading.Event().wait()
    assert time.perf_counter() - t < 5


def test_watchdog_interrupts_a_worker_thread() -> None:
    caught: list[BaseException] = []

    def work() -> None:
        try:
            with watchdog(0.3, lambda: "segment 2 at 16 tokens"):
                while True:
                    time.sleep(0.01)
        except CaptureTimeoutError as exc:
            caught.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and len(caught) == 1


def test_watchdog_is_silent_when_work_finishes() -> None:
    with watchdog(0.5, lambda: "x"):
        time.sleep(0.01)
    time.sleep(0.6)  # the timer must have been disarmed


def test_hip_is_detected_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.3.42131", raising=False)
    assert platform.is_hip()
    assert platform.platform_name(torch.device("cuda", 0)) == "rocm"
    assert platform.platform_name(torch.device("cpu")) == "emulated"
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert platform.platform_name(torch.device("cuda", 0)) == "cuda"


def test_rocm_device_env_is_set_before_capture(monkeypatch: pytest.MonkeyPatch) -> None:
    props = SimpleNamespace(multi_processor_count=304, gcnArchName="gfx942:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.delenv("CU_NUM", raising=False)
    monkeypatch.delenv("GPU_ARCHS", raising=False)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    hygiene._rocm_env(torch.device("cuda", 0))
    assert "CU_NUM" not in os.environ  # CUDA: nothing to do
    monkeypatch.setattr(torch.version, "hip", "6.3", raising=False)
    hygiene._rocm_env(torch.device("cuda", 0))
    assert os.environ["CU_NUM"] == "304" and os.environ["GPU_ARCHS"] == "gfx942"
    assert "rocm_env" in hygiene.warmup_hooks()


def test_readme_example_runs_on_cpu() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "wrap_model.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "max |pcg - eager| = 0.00e+00" in done.stdout
    assert "emulated" in done.stderr + done.stdout
