"""Tensor parallelism for the engine: rank 0 runs the scheduler, every rank runs every forward.

Rank 0 is the engine's own process (the caller's, or the server's engine process). `TensorParallel.start`
spawns ranks 1..N-1 (or, under torchrun, joins the ranks torchrun started); each builds the same model
and the same `ModelRunner` (same graph capture sizes, same KV pages: the least any rank can hold), then
waits in `run_worker`. Before each of rank 0's forwards, `publish` sends the others that forward's
batch as one int64 message over a gloo group: the `ForwardBatch`'s host arrays (token ids, positions,
slot mapping, layout rows, page table, logits rows), its `BatchDescriptor`, and which runner runs it
(the target's, or a draft's: speculative decoding's draft model or EAGLE head). Inputs that are on
rank 0's device — token ids drafted there, an EAGLE head's features — follow as broadcasts over the
model's own group, so they never go through the host. Every rank runs the forward (the model's
collectives pair up); only rank 0 samples and drafts. Pages and the prefix cache stay rank 0's: the
workers index their caches by the slots it sends.

Start-up, in the same order on every rank: the process group; `new_group` for the step messages; the
model and the draft, if any; `agree_pages` (an all-reduce: the least pages); the runners (graph
capture, with the model's collectives); `ready` (a barrier). Then one message per forward, and a stop
message at `close`.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from tessera.distributed import WorkerError, destroy, init_distributed, set_all_reduce_placement, tp_group
from tessera.distributed.workers import Workers
from tessera.engine.batch import ForwardBatch
from tessera.engine.config import EngineConfig
from tessera.engine.model_runner import ModelRunner, num_kv_pages
from tessera.engine.speculative.build import cached_models, draft_runner, load_draft
from tessera.engine.torchrun import check_parallel, torchrun_config, torchrun_rank
from tessera.graphs import BatchDescriptor, GraphMode
from tessera.loader.model_loader import load_model

__all__ = ["TensorParallel", "WorkerError", "run_worker", "serve_torchrun_worker"]

logger = logging.getLogger("tessera")
START_TIMEOUT_S = 1800.0  # loading and capturing on every rank (a dead rank is named at once regardless)
# NOTE: the step group's collectives never time out: a worker waits there for its next step however long
# the engine idles. Rank 0 bounds its own waits by `dist_timeout` instead (Work.wait's timeout).
IDLE_TIMEOUT = timedelta(days=365)
DEVICE_POLL_S = 50e-6  # how often rank 0 looks whether its forward finished (and its workers live)
_MODES = list(GraphMode)
# message: [kind, T, B, page-table columns, logits rows, mode, padded tokens, seqs, uniform decode, flags]
# then the payload; a payload longer than INLINE goes in a second broadcast
HEADER, INLINE = 10, 8192
_STOP, _STEP = 0, 1
# flags: the draft's runner runs it; its token ids, its features follow from rank 0's device; its
# features are the target's last hidden states, which every rank holds (an EAGLE head's catch-up)
_DRAFT, _IDS, _FEATURES, _TARGET_FEATURES = 1, 2, 4, 8


class TensorParallel:
    """Rank 0's side: the step channel and (when it spawned them) the worker processes."""

    def __init__(self, config: EngineConfig, workers: Workers | None) -> None:
        self.config, self.workers = config, workers
        self.timeout_s = config.dist_timeout
        self.group = _step_group()
        self._buffer = torch.zeros(HEADER + INLINE, dtype=torch.long)
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.steps = 0
        self.started = self.closed = False
        self.error: WorkerError | None = None  # why the ranks were abandoned
        self._target: ModelRunner | None = None  # the target's runner, once ready

    @classmethod
    def start(cls, config: EngineConfig) -> TensorParallel | None:
        """Join (or spawn, then join) the ranks of `config.tensor_parallel_size`; None with one rank."""
        n, ep = config.tensor_parallel_size, config.expert_parallel_size
        if n == 1:
            return None
        check_parallel(config)
        rank = torchrun_rank()
        if rank not in (None, 0):
            raise RuntimeError(
                f"rank {rank} of torchrun builds no engine: ranks > 0 call "
                "tessera.engine.parallel.serve_torchrun_worker(config)"
            )
        backend = _backend(config)
        if rank == 0:
            init_distributed(backend=backend, ep=ep, timeout_s=config.dist_timeout)
            return cls(config, None)
        workers = Workers.start(run_worker, n, config, backend=backend, ep=ep, timeout_s=config.dist_timeout)
        logger.info("tensor parallel: %d ranks (%s), workers %s", n, backend, workers.pids)
        try:
            return cls(config, workers)
        except BaseException as exc:
            error = workers.failure(exc)
            workers.stop(timeout_s=0)
            destroy()
            if error is exc:
                raise
            raise error from exc

    @property
    def pids(self) -> list[int]:
        """The worker processes this rank spawned ([] under torchrun)."""
        return self.workers.pids if self.workers is not None else []

    def agree_pages(self, pages: int) -> int:
        """The KV pages every rank can hold: the least of what each would allocate."""
        count = torch.tensor([pages], dtype=torch.long)
        self._wait(dist.all_reduce(count, op=dist.ReduceOp.MIN, group=self.group, async_op=True), "KV pages")
        return int(count.item())

    def ready(self, runner: ModelRunner, draft: ModelRunner | None = None) -> None:
        """Every rank has built its runners: from here on each forward of `runner` (the target's) and
        of `draft` (a draft's, if any) is published."""
        self._wait(dist.barrier(group=self.group, async_op=True), "start-up")
        runner.on_forward = self.publish
        self._target = runner
        if draft is not None:
            draft.on_forward = functools.partial(self.publish, draft=True)
        self.started = True

    def publish(self, batch: ForwardBatch, d: BatchDescriptor, draft: bool = False) -> None:
        """Send the other ranks the forward rank 0 is about to run, of the target or (`draft`) the
        draft's runner: the host message asynchronously (the last message's sends are waited for first,
        bounded by `dist_timeout`), then the inputs on the device as broadcasts queued on it."""
        if self.error is not None:
            raise self.error
        if self.workers is not None:
            self.workers.check()  # a dead worker named before anything waits on it
        self.settle()
        features = batch.features
        if features is not None and self._target is not None and _is_last_hidden(features, self._target):
            features, flags = None, _TARGET_FEATURES
        else:
            flags = _FEATURES * (features is not None)
        flags |= _DRAFT * draft | _IDS * batch.ids_on_device
        message = pack(batch, d, flags)
        if len(message) <= HEADER + INLINE:
            self._buffer[: len(message)] = torch.from_numpy(message)
            self._send(self._buffer)
        else:
            self._buffer[:HEADER] = torch.from_numpy(message[:HEADER])
            self._send(self._buffer)
            self._send(torch.from_numpy(message[HEADER:]))
        if batch.ids_on_device:
            dist.broadcast(batch.input_ids.contiguous(), 0, group=tp_group())
        if features is not None:
            dist.broadcast(features.contiguous(), 0, group=tp_group())
        self.steps += 1

    def settle(self) -> None:
        """Wait until the workers took the last message; `WorkerError` if one died meanwhile."""
        pending, self._pending = self._pending, []
        try:
            for work, _ in pending:
                work.wait(timedelta(seconds=self.timeout_s))
        except Exception as exc:
            raise self.failure(exc) from exc

    def wait_device(self) -> None:
        """Wait for the forward rank 0 just queued on its GPU, naming a spawned worker that dies meanwhile:
        NCCL returns once a collective is queued, so rank 0 would otherwise block in its next sync on a
        collective waiting for a dead peer until NCCL's watchdog ended the process, unreported."""
        if self.workers is None or self.config.torch_device.type != "cuda":
            return
        done = torch.cuda.Event()
        done.record()
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            self.workers.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"a tensor-parallel forward did not finish within {self.timeout_s:.0f}s")
            time.sleep(DEVICE_POLL_S)

    def failure(self, exc: BaseException) -> BaseException:
        """What rank 0 raises for `exc`, met in a forward or a send: the worker to blame where one died."""
        if not isinstance(exc, RuntimeError | TimeoutError):  # rank 0's own (a missing file, a bad value)
            return exc
        if self.workers is not None:
            error = self.workers.failure(exc)
            if error is not exc:
                return error
        if "timed out" in str(exc).lower():
            return TimeoutError(f"a tensor-parallel rank did not answer within {self.timeout_s:.0f}s: {exc}")
        return exc

    def abandon(self, error: WorkerError) -> None:
        """End the workers at once (they wait inside a forward rank 0 left) and leave the group; every
        later forward raises `error`."""
        self.error = error
        self._close(stop=False)

    def close(self) -> None:
        """Stop the workers (a stop message, then their exit; those still running after it are ended) and
        leave the process group."""
        self._close(stop=True)

    def _close(self, stop: bool) -> None:
        if self.closed:
            return
        self.closed = True
        if self.started and stop:
            try:
                self.settle()
                self._buffer[:HEADER] = _STOP
                self._send(self._buffer)
                self.settle()
                if self.workers is not None:
                    self.workers.stop()
            except Exception as exc:  # a dead worker: the others are ended below
                logger.warning("tensor parallel: stopping the workers: %s", exc)
        if self.workers is not None:
            self.workers.stop(timeout_s=0)
        destroy()

    def _send(self, tensor: torch.Tensor) -> None:
        self._pending.append((dist.broadcast(tensor, 0, group=self.group, async_op=True), tensor))

    def _wait(self, work: dist.Work, what: str) -> None:
        if self.workers is not None:
            self.workers.wait(work, what, START_TIMEOUT_S)
        else:
            work.wait()


def pack(batch: ForwardBatch, d: BatchDescriptor, flags: int = 0) -> np.ndarray:
    """One forward as int64: the header, `host`, the page table, the logits rows."""
    b, cols = batch.host_pages.shape
    t = batch.num_tokens
    header = [_STEP, t, b, cols, len(batch.host_logits), _MODES.index(d.mode), d.num_tokens, d.num_seqs,
              int(d.uniform_decode), flags]  # fmt: skip
    return np.concatenate(
        (np.array(header, dtype=np.int64), batch.host, batch.host_pages.ravel(), batch.host_logits)
    )


def unpack(
    header: np.ndarray, payload: np.ndarray, device: torch.device
) -> tuple[ForwardBatch, BatchDescriptor]:
    _, t, b, cols, logits, mode, tokens, seqs, uniform, _ = header.tolist()
    host_len = 3 * t + 4 * b
    host = payload[:host_len].copy()
    table = payload[host_len : host_len + b * cols].reshape(b, cols).copy()
    batch = ForwardBatch(host, table, device)
    batch.select_logits(payload[host_len + b * cols : host_len + b * cols + logits].copy())
    return batch, BatchDescriptor(_MODES[mode], tokens, seqs, bool(uniform))


def run_worker(rank: int, world_size: int, config: EngineConfig) -> None:
    """A rank > 0: build the model and runner as rank 0 does, then run each forward rank 0 sends until
    it says stop. Torchrun's ranks call it after `init_distributed()` (see `serve_torchrun_worker`)."""
    group = _step_group()
    device = config.torch_device
    set_all_reduce_placement(config.all_reduce_placement)
    model, _, model_config = load_model(
        config.model, config.torch_dtype, device, config.load_format, quantization=config.quantization
    )
    draft = load_draft(config, model, config.context_length or model_config.max_position_embeddings)
    count = torch.tensor(
        [num_kv_pages(config, cached_models(config, model, draft), device)], dtype=torch.long
    )
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=group)
    runner = ModelRunner(model, config, num_pages=int(count.item()))
    runners = [runner, draft_runner(config, draft, runner)]
    dist.barrier(group=group)
    logger.info("tensor parallel: rank %d of %d ready", rank, world_size)
    buffer = torch.empty(HEADER + INLINE, dtype=torch.long)
    while True:
        dist.broadcast(buffer, 0, group=group)
        message = buffer.numpy()
        header = message[:HEADER]
        if header[0] == _STOP:
            return
        _, t, b, cols, logits = header[:5].tolist()
        size = 3 * t + 4 * b + b * cols + logits
        if size <= INLINE:
            payload = message[HEADER : HEADER + size]
        else:
            extra = torch.empty(size, dtype=torch.long)
            dist.broadcast(extra, 0, group=group)
            payload = extra.numpy()
        batch, d = unpack(header, payload, runner.device)
        _forward(runners, batch, d, int(header[9]))


def _forward(runners: list[ModelRunner | None], batch: ForwardBatch, d: BatchDescriptor, flags: int) -> None:
    """A worker's side of a published forward: its device inputs from rank 0, then the forward."""
    runner = runners[flags & _DRAFT]
    assert runner is not None, "rank 0 sent a draft's forward to a worker with no draft"
    t = batch.num_tokens
    if flags & _IDS:
        ids = torch.empty(t, dtype=torch.long, device=runner.device)
        dist.broadcast(ids, 0, group=tp_group())
        batch.feed_ids(ids)
    if flags & _FEATURES:
        features = torch.empty(t, runner.model_config.hidden_size, dtype=runner.dtype, device=runner.device)
        dist.broadcast(features, 0, group=tp_group())
        batch.features = features
    if flags & _TARGET_FEATURES:
        hidden = runners[0].last_hidden  # type: ignore[union-attr]
        assert hidden is not None
        batch.features = hidden[:t]
    runner.forward(batch, d)


def _is_last_hidden(features: torch.Tensor, target: ModelRunner) -> bool:
    """Whether `features` are the first rows of `target`'s last hidden states (a view of them)."""
    hidden = target.last_hidden
    return (
        hidden is not None
        and features.data_ptr() == hidden.data_ptr()
        and features.stride() == hidden.stride()
        and features.shape[0] <= hidden.shape[0]
    )


def serve_torchrun_worker(config: EngineConfig) -> None:
    """`tessera serve|generate` on a torchrun rank > 0: join the ranks, serve rank 0's forwards, leave."""
    config = torchrun_config(config)
    rank = torchrun_rank()
    assert rank is not None and rank > 0
    init_distributed(backend=_backend(config), ep=config.expert_parallel_size, timeout_s=config.dist_timeout)
    try:
        run_worker(rank, config.tensor_parallel_size, config)
    finally:
        destroy()


def _step_group() -> dist.ProcessGroup:
    # NOTE: gloo whatever the model's collectives use: the messages are small host arrays, and this group's
    # waits must not time out while the engine idles
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.torch_device.type == "cuda" else "gloo"
