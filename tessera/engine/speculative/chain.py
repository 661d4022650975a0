"""Greedy drafting of several tokens a request, chained on the device.

A proposal's draft forwards are known before the first runs, all but their token ids: which requests
still draft at each step (each has its room), at which positions, into which KV slots. So every step's
batch is built on the host up front, and each step's token ids (and an EAGLE head's features) are
gathered on the device from the step before's outputs. The drafts stay there (`DeviceDrafts`): the
verify forward reads them from the device and the host waits for none of them before launching it (a
per-step `.tolist()` idled the GPU for the host's preparation of the next step, every step; one a
proposal, for the preparation of the verify).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tessera.engine.batch import ForwardBatch, Row, build_rows
from tessera.engine.model_runner import ModelRunner
from tessera.engine.speculative import DeviceDrafts
from tessera.layers.host_copy import to_device


def _plan(rows: list[Row], rooms: list[int], runner: ModelRunner) -> list[tuple[ForwardBatch, list[int]]]:
    """Each step's batch and the requests (indices into `rows`) in it, in its logits' order."""
    page_size, device = runner.page_size, runner.device
    steps = [(build_rows(rows, page_size, device), list(range(len(rows))))]
    for j in range(1, max(rooms, default=0)):
        active = [i for i in steps[-1][1] if rooms[i] > j]
        if not active:
            break
        # draft j + 1 of request i takes draft j, at the position after the ones run before
        step_rows = [([0], rows[i][1] + len(rows[i][0]) + j - 1, rows[i][2]) for i in active]
        steps.append((build_rows(step_rows, page_size, device), active))
    return steps


def _picks(steps: list[tuple[ForwardBatch, list[int]]], device: torch.device) -> list[torch.Tensor]:
    """For each step after the first, the rows of the step before that its requests were (one upload)."""
    host: list[np.ndarray] = []
    for (_, before), (_, active) in itertools.pairwise(steps):
        where = {request: row for row, request in enumerate(before)}
        host.append(np.array([where[i] for i in active], dtype=np.int64))
    if not host:
        return []
    return list(to_device(np.concatenate(host), device).split([len(h) for h in host]))


def greedy(runner: ModelRunner, logits: torch.Tensor) -> torch.Tensor:
    """Each row's most likely token: the argmax, through the model's hot vocabulary if it drafts from
    one (an EAGLE head's `draft_vocab`)."""
    best = logits.argmax(dim=-1)
    vocab = getattr(runner.model, "draft_vocab", None)
    return best if vocab is None else vocab[best]


@dataclass
class Chain:
    """A launched chain: each step's batch with the requests in it, and its draft tokens on the device."""

    steps: list[tuple[ForwardBatch, list[int]]]
    tokens: list[torch.Tensor]

    def device_drafts(self, num_rows: int) -> DeviceDrafts:
        """Each request's drafts, request-major, on the device."""
        return request_major(self.tokens, [active for _, active in self.steps], num_rows)


def request_major(tokens: list[torch.Tensor], actives: list[list[int]], num_rows: int) -> DeviceDrafts:
    """The drafts of steps whose tokens are `tokens[j]`, one for each request (of `num_rows`) in
    `actives[j]`, in that order, laid out request by request (one gather on the device, none where the
    steps' order is that already: one request, or one step)."""
    where: list[list[int]] = [[] for _ in range(num_rows)]
    at = itertools.count()
    for active in actives:
        for i in active:
            where[i].append(next(at))
    flat = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
    index = np.fromiter(itertools.chain.from_iterable(where), dtype=np.int64, count=flat.shape[0])
    if not np.array_equal(index, np.arange(index.size)):
        flat = flat[to_device(index, flat.device)]
    return DeviceDrafts([len(w) for w in where], flat)


@torch.no_grad()
def launch(
    runner: ModelRunner,
    rows: list[Row],
    rooms: list[int],
    features: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
) -> Chain:
    """Queue the forwards that draft `rooms[i]` (>= 1) greedy tokens for request i, whose first draft
    forward is `rows[i]` (its tokens not yet run, the position of the first, its pages) and each later
    one the draft before; nothing waits for the device. `features`: an EAGLE head's, one a request (its
    rows are one token each); later steps take the head's output at the row before. `ids`: the first
    step's token ids on the device (the rows' own are then placeholders)."""
    if features is not None and any(len(tokens) != 1 for tokens, _, _ in rows):
        raise ValueError("a feature per request goes with one-token rows")
    steps = _plan(rows, rooms, runner)
    picks = _picks(steps, runner.device)
    tokens: list[torch.Tensor] = []
    for j, (batch, _) in enumerate(steps):
        if j:
            batch.feed_ids(tokens[-1][picks[j - 1]])
            features = features[picks[j - 1]] if features is not None else None
        elif ids is not None:
            batch.feed_ids(ids)
        batch.features = features
        tokens.append(greedy(runner, runner.forward(batch)))
        if features is not None:
            features = runner.last_logits_hidden  # a copy: graph memory moves on
    return Chain(steps, tokens)
