"""The graph runner on the emulated CPU backend: dispatch, padding, fallbacks, context, debug checks."""

from __future__ import annotations

import logging

import pytest
import torch

from tessera.graphs import (
    AddressMismatchError,
    BatchDescriptor,
    CaptureError,
    FullGraphRunner,
    GraphConfig,
    GraphMode,
    PaddingLeakError,
    PiecewiseGraphRunner,
    make_backend,
)

from .graph_models import (
    BINDS,
    SEEN,
    TINY,
    Leaky,
    Recorder,
    SumsAllRows,
    flippable,
    ids,
    tiny_model,
)

STRATEGIES = ["breakable", "compile"]
SIZES = [4, 8, 16, 32]


def _runner(model: torch.nn.Module, strategy: str, **kwargs: object) -> PiecewiseGraphRunner:
    cfg = GraphConfig(strategy=strategy, capture_sizes=kwargs.pop("sizes", SIZES), progress=False, **kwargs)
    runner = PiecewiseGraphRunner(model, cfg)
    with torch.no_grad():
        runner.capture([ids(5)])
    return runner


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_replay_equals_eager_at_and_between_sizes(strategy: str) -> None:
    model = tiny_model()
    runner = _runner(model, strategy)
    for n in [1, 3, 4, 5, 8, 9, 15, 16, 17, 31, 32]:
        x = ids(n)
        out = runner(x)
        assert out.shape == (n, TINY.hidden_size)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert sum(runner.stats.replays.values()) == 11
    assert runner.stats.sizes("piecewise")[4] == 3 and runner.stats.sizes("piecewise")[32] == 3
    assert not runner.stats.fallbacks


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_piece_more_than_split_ops(strategy: str) -> None:
    runner = _runner(tiny_model(), strategy)
    assert runner.report is not None
    assert runner.report.num_pieces == TINY.num_layers + 1
    assert runner.report.num_sizes == len(SIZES)
    if strategy == "compile":
        assert runner.strategy.splits == ["tessera_toy::attention"] * TINY.num_layers


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_padding_stats_and_slicing(strategy: str) -> None:
    runner = _runner(tiny_model(), strategy)
    assert [runner.padded_size(n) for n in (1, 4, 5, 32, 33)] == [4, 4, 8, 32, None]
    runner(ids(5))
    runner(ids(30))
    stats = runner.stats.as_dict()
    assert stats["replays"] == {"piecewise": {"8": 1, "32": 1}}
    assert stats["real_tokens"] == 35 and stats["padded_tokens"] == 3 + 2


@torch.no_grad()
def test_a_descriptor_decides_the_run() -> None:
    model = tiny_model()
    runner = _runner(model, "breakable")
    assert runner.descriptor(5) == BatchDescriptor(GraphMode.PIECEWISE, 8)
    assert runner.descriptor(33) == BatchDescriptor(GraphMode.EAGER, 33)
    x = ids(5)
    out = runner.run(BatchDescriptor(GraphMode.PIECEWISE, 16), x)  # any captured size that fits
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert runner.stats.sizes("piecewise") == {16: 1}
    with pytest.raises(ValueError, match="no piecewise graphs captured"):
        runner.run(BatchDescriptor(GraphMode.PIECEWISE, 12), x)
    with pytest.raises(ValueError, match="do not fit"):
        runner.run(BatchDescriptor(GraphMode.PIECEWISE, 4), x)
    with pytest.raises(ValueError, match="layout"):
        BatchDescriptor(GraphMode.PIECEWISE, 8, num_seqs=2)


class _StaticRows:
    """The caller's side of a full graph: a static input buffer, a forward over it, and staging."""

    def __init__(self, mixes_rows: bool) -> None:
        self.x = torch.zeros(8, 3)
        self.mixes_rows = mixes_rows

    def forward(self, d: BatchDescriptor) -> torch.Tensor:
        x = self.x[: d.num_tokens]
        return x * 2 + (x.sum(0) if self.mixes_rows else 0)  # the leak: every row reads every row

    def stage(self, d: BatchDescriptor, batch: torch.Tensor | None) -> None:
        self.x.zero_()
        if batch is not None:
            self.x[: batch.shape[0]] = batch

    def poison(self, d: BatchDescriptor, n: int) -> None:
        self.x[n : d.num_tokens] = 1e6


@pytest.mark.parametrize("mixes_rows", [False, True])
def test_full_graphs_replay_their_caller_s_buffers_and_catch_padding_leaks(mixes_rows: bool) -> None:
    rows = _StaticRows(mixes_rows)
    full = FullGraphRunner(rows.forward, rows.stage, make_backend(torch.device("cpu")), poison=rows.poison)
    descriptors = [BatchDescriptor(GraphMode.FULL, t, t, True) for t in (4, 8)]
    full.capture(descriptors, progress=False)
    assert full.descriptors == descriptors
    batch = torch.randn(3, 3)
    if mixes_rows:
        with pytest.raises(PaddingLeakError, match="3 of 3 real rows"):
            full.run(descriptors[0], batch, 3)
        return
    torch.testing.assert_close(full.run(descriptors[0], batch, 3), batch * 2)
    assert full.stats.sizes("full-decode") == {4: 1} and full.stats.padded_tokens == 1
    with pytest.raises(ValueError, match="5 tokens cannot run"):
        full.run(descriptors[0], torch.randn(5, 3), 5)
    with pytest.raises(ValueError, match="FULL descriptors only"):
        full.capture([BatchDescriptor(GraphMode.PIECEWISE, 4)])


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_oversize_batch_runs_eagerly_warns_once_and_is_counted(
    strategy: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_model()
    runner = _runner(model, strategy)
    with caplog.at_level(logging.WARNING, logger="tessera.graphs"):
        for n in (33, 100):
            x = ids(n)
            torch.testing.assert_close(runner(x), model(x))
    assert runner.stats.fallbacks == {"oversize": 2}
    assert sum("oversize" in r.message for r in caplog.records) == 1


@torch.no_grad()
def test_dynamo_recompile_after_startup_falls_back_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = flippable()
    runner = _runner(model, "compile")
    model.flip = True  # a guarded constant: the next call makes Dynamo recompile
    x = ids(6)
    with caplog.at_level(logging.WARNING, logger="tessera.graphs"):
        out = runner(x)
        runner(ids(7))
    torch.testing.assert_close(out, model(x))
    assert runner.stats.fallbacks == {"recompile": 2}
    assert not runner.stats.replays
    assert sum("recompile" in r.message for r in caplog.records) >= 1


@torch.no_grad()
def test_recompile_limit_after_startup_does_not_crash() -> None:
    model = flippable()
    runner = _runner(model, "compile")
    model.flip = True
    with torch._dynamo.config.patch(recompile_limit=1):
        x = ids(6)
        torch.testing.assert_close(runner(x), model(x))
    assert runner.stats.fallbacks == {"recompile": 1}


@torch.no_grad()
def test_changed_float_attribute_is_never_replayed_stale() -> None:
    # Whether Dynamo guards the float (recompile) or turns it into a fresh 0-d tensor input (once it
    # has seen it change, in any runner), the output must follow the new value.
    for eps in (0.5, 0.25, 0.125):
        model = tiny_model()
        runner = _runner(model, "compile", debug_addresses=True)
        x = ids(6)
        torch.testing.assert_close(runner(x), model(x))
        model.norm.eps = eps
        torch.testing.assert_close(runner(x), model(x))


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_context_carries_sizes_metadata_and_both_layer_roles(strategy: str) -> None:
    mha, mqa = object(), object()
    cfg = GraphConfig(strategy=strategy, capture_sizes=[8, 16], progress=False)
    runner = PiecewiseGraphRunner(
        Recorder(), cfg, layers={(0, "mha"): mha, (0, "mqa"): mqa}, capture_metadata=lambda n: ("dummy", n)
    )
    runner.capture([torch.randn(3, 8)])
    SEEN.clear()
    runner(torch.randn(5, 8), metadata="batch-1")
    num_tokens, raw, metadata, seen_mha, seen_mqa, _ = SEEN[-1]
    assert (num_tokens, raw, metadata) == (8, 5, "batch-1")
    assert seen_mha is mha and seen_mqa is mqa
    SEEN.clear()
    runner(torch.randn(20, 8), metadata="big")  # eager fallback sees the same kind of context
    assert SEEN[-1][:3] == (20, 20, "big")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gc_is_frozen_during_capture_only(strategy: str) -> None:
    cfg = GraphConfig(strategy=strategy, capture_sizes=[8], progress=False)
    runner = PiecewiseGraphRunner(Recorder(), cfg, layers={(0, "mha"): 1, (0, "mqa"): 2})
    SEEN.clear()
    with torch.no_grad():
        runner.capture([torch.randn(3, 8)])
        assert SEEN and not any(enabled for *_, enabled in SEEN)
        SEEN.clear()
        runner(torch.randn(3, 8))
    assert SEEN[-1][-1] is True


def test_missing_layer_role_names_the_roles_there() -> None:
    cfg = GraphConfig(capture_sizes=[8], progress=False)
    runner = PiecewiseGraphRunner(Recorder(), cfg, layers={(0, "mha"): 1})
    with pytest.raises(CaptureError, match=r"role='mqa'.*\['mha'\]"), torch.no_grad():
        runner.capture([torch.randn(3, 8)])


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_padded_rows_of_split_op_outputs_are_zeroed(strategy: str) -> None:
    model = SumsAllRows()
    cfg = GraphConfig(strategy=strategy, capture_sizes=[8, 16], progress=False)
    runner = PiecewiseGraphRunner(model, cfg)
    runner.capture([torch.randn(3, 8)])
    for n in (3, 8, 11, 3):
        x = torch.randn(n, 8)
        torch.testing.assert_close(runner(x), model(x))
    assert runner.stats.sizes("piecewise") == {8: 3, 16: 1}


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_poison_mode_passes_on_a_row_independent_model(strategy: str) -> None:
    runner = _runner(tiny_model(), strategy, poison_padding=True)
    for n in (1, 5, 13):
        runner(ids(n))
    assert sum(runner.stats.replays.values()) == 3
    # no in-graph mask in the toy: its replays skip refreshing the device count of real rows
    assert not runner.reads_num_real and runner._context(16, 5, None).num_real is None


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_poison_mode_catches_an_op_that_mixes_padded_rows(strategy: str) -> None:
    runner = _runner(Leaky(), strategy, poison_padding=True)
    runner(ids(8))  # no padding: nothing to check
    with pytest.raises(PaddingLeakError, match=r"output 0: 5 of 5 real rows"):
        runner(ids(5))


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_address_check_catches_a_rebound_parameter(strategy: str) -> None:
    model = tiny_model()
    runner = _runner(model, strategy, debug_addresses=True)
    runner(ids(5))
    weight = model.blocks[1].o.weight
    weight.data = weight.data.clone()  # same values, new storage: a graph would read the old one
    with pytest.raises(AddressMismatchError, match="moved"):
        runner(ids(5))


@torch.no_grad()
def test_piece_address_check_names_piece_and_size() -> None:
    runner = _runner(tiny_model(), "compile", debug_addresses=True)
    piece = runner.strategy.pieces[1]
    piece.entries[8].addresses[0] += 64  # as if its first input had moved since capture
    runner.config.__dict__["debug_addresses"] = True
    runner._addresses = runner._tensor_addresses()
    with pytest.raises(AddressMismatchError, match="piece 1 at 8 tokens: input 0 moved"):
        runner(ids(6))


def test_capture_twice_is_refused() -> None:
    runner = _runner(tiny_model(), "breakable")
    with pytest.raises(RuntimeError, match="capture after start-up is refused"):
        runner.capture([ids(3)])


class _FailsAt16(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 16 and not torch.compiler.is_compiling():
            raise RuntimeError("kernel exploded")
        return self.inner(x)


def test_capture_error_names_where_and_how_to_disable() -> None:
    cfg = GraphConfig(capture_sizes=[8, 16], progress=False, disable_hint="pass --no-graphs")
    runner = PiecewiseGraphRunner(_FailsAt16(), cfg)
    with (
        pytest.raises(CaptureError, match=r"at 16 tokens.*kernel exploded.*pass --no-graphs"),
        torch.no_grad(),
    ):
        runner.capture([ids(3)])


@torch.no_grad()
def test_disabled_runs_eagerly_and_counts() -> None:
    model = tiny_model()
    runner = PiecewiseGraphRunner(model, GraphConfig(enabled=False))
    assert runner.capture([ids(3)]) is None
    x = ids(7)
    torch.testing.assert_close(runner(x), model(x))
    assert runner.stats.fallbacks == {"disabled": 1}


@torch.no_grad()
def test_bad_inputs_get_clear_errors() -> None:
    runner = _runner(tiny_model(), "breakable")
    with pytest.raises(ValueError, match="does not match the captured"):
        runner(torch.randn(5))
    with pytest.raises(ValueError, match="expected 1 inputs, got 2"):
        runner(ids(5), ids(5))


def test_init_report() -> None:
    runner = _runner(tiny_model(), "breakable")
    report = runner.report
    assert report is not None
    d = report.as_dict()
    assert d["platform"] == "emulated" and d["num_sizes"] == 4
    assert set(d["seconds"]) == {"warmup_hooks", "warmup", "capture"}
    assert "4 sizes x 4 pieces" in report.summary()


@torch.no_grad()
def test_inductor_pieces_match_eager() -> None:
    model = tiny_model()
    runner = _runner(model, "compile", compiler="inductor", sizes=[8, 16])
    for n in (3, 8, 11, 16):
        x = ids(n)
        torch.testing.assert_close(runner(x), model(x), rtol=1e-4, atol=1e-4)
    assert not runner.stats.fallbacks


@torch.no_grad()
def test_compiled_replays_call_split_ops_as_bound_at_capture() -> None:
    """The compile strategy binds a split op once per captured size and replays that (the per-call
    host work of a launch done once); padded rows are still zeroed, and an eager fallback calls the op
    itself. (Breakable graphs bind their eager steps on CUDA; the emulated backend reruns the forward.)"""
    torch.manual_seed(0)
    BINDS.update(binds=0, bound_calls=0, plain_calls=0)
    model = SumsAllRows(torch.ops.tessera_test.bound_scale).eval()
    runner = PiecewiseGraphRunner(model, GraphConfig(strategy="compile", capture_sizes=SIZES, progress=False))
    runner.capture([torch.randn(5, 8)])
    assert BINDS["binds"] == len(SIZES)
    BINDS.update(bound_calls=0, plain_calls=0)
    for n in (1, 5, 8, 32):
        x = torch.randn(n, 8)
        torch.testing.assert_close(runner(x), model(x))  # sums every row: a padded row would show
    assert BINDS["bound_calls"] == 4 and BINDS["plain_calls"] == 4  # the 4 plain ones: model(x)
    runner(torch.randn(40, 8))  # oversize: eager
    assert BINDS["bound_calls"] == 4 and BINDS["plain_calls"] == 5
    assert BINDS["binds"] == len(SIZES)


@pytest.mark.parametrize("strategy", STRATEGIES)
@torch.no_grad()
def test_a_dropped_runner_frees_its_model(strategy: str) -> None:
    """Nothing a runner hands to Dynamo (which keeps code objects and backends for the process's life)
    may keep its model, graphs or KV cache alive once the runner is dropped, and one collection frees
    them, the runner in a reference cycle as an engine's is (the collector, not a refcount, drops it)."""
    import gc
    import weakref

    model = tiny_model()
    runner = _runner(model, strategy)
    runner(ids(7))
    # the compile strategy's pieces hold its graphs and what split ops were bound to (the KV cache)
    held = [model, runner.strategy, *getattr(runner.strategy, "pieces", [])]
    dead = [weakref.ref(x) for x in held]
    cycle: list[object] = [runner]
    cycle.append(cycle)
    del model, runner, held, cycle
    gc.collect()
    assert [ref() for ref in dead] == [None] * len(dead)
