"""build_batch's tensors against a per-sequence reference, on random mixed batches (prefill chunks over
cached prefixes, decodes, recomputes reaching into the outputs)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tessera.engine.batch import SHORT_QUERY_LEN, build_batch
from tessera.engine.kv_manager import PagePool
from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence


def _random_work(rng: random.Random, pool: PagePool, page: int) -> list[tuple[Sequence, int]]:
    work = []
    for _ in range(rng.randint(1, 40)):
        prompt, outputs = rng.randint(1, 300), rng.randint(0, 20)
        seq = Sequence([rng.randrange(1000) for _ in range(prompt)], SamplingParams())
        seq.output_token_ids = [rng.randrange(1000) for _ in range(outputs)]
        seq.num_cached = rng.randint(0, prompt + outputs - 1)
        n = rng.randint(1, seq.num_tokens - seq.num_cached)
        seq.pages = pool.allocate(-(-(seq.num_cached + n) // page))  # what the scheduler reserves
        work.append((seq, n))
    return work


@pytest.mark.parametrize("page", [1, 4, 16])
def test_batch_tensors_match_a_per_sequence_reference(page: int) -> None:
    rng = random.Random(page)
    for _ in range(30):
        pool = PagePool(20000)
        work = _random_work(rng, pool, page)
        batch = build_batch(work, page, torch.device("cpu"))
        # the reference: short sequences first (a stable partition), then each sequence's rows in turn
        order = sorted(range(len(work)), key=lambda i: work[i][1] > SHORT_QUERY_LEN)
        ids, positions, slots, q_start, last = [], [], [], [], [0] * len(work)
        for i in order:
            seq, n = work[i]
            start = seq.num_cached
            q_start.append(len(ids))
            ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            slots += [seq.pages[p // page] * page + p % page for p in range(start, start + n)]
            last[i] = len(ids) - 1
        kernel = batch.metadata.kernel
        assert batch.input_ids.tolist() == ids and batch.positions.tolist() == positions
        assert batch.metadata.slot_mapping.tolist() == slots and batch.logits_indices.tolist() == last
        assert kernel.q_start.tolist() == q_start
        assert kernel.q_len.tolist() == [work[i][1] for i in order]
        assert kernel.ctx_len.tolist() == [work[i][0].num_cached + work[i][1] for i in order]
        assert kernel.q_start.dtype == kernel.page_table.dtype == torch.int32
        for row, i in zip(kernel.page_table.tolist(), order, strict=True):
            used = -(-kernel.ctx_len.tolist()[order.index(i)] // page)
            assert row[:used] == work[i][0].pages[:used] and not any(row[used:])


def test_a_sequence_without_its_pages_is_refused() -> None:
    seq = Sequence(list(range(20)), SamplingParams())
    seq.pages = [1]  # 16 tokens' worth of 4-token pages would be 5
    with pytest.raises(ValueError, match="holds 1 KV pages, 5 needed"):
        build_batch([(seq, 20)], 4, torch.device("cpu"))


def test_ids_fed_on_the_device_leave_the_hosts_as_they_were() -> None:
    """A batch's device tensors are copies of its host arrays on every device, the CPU included: ids fed
    on the device (a verify's drafts) never reach `host`, as on a GPU, where a read of a placeholder on
    the host cannot be hidden by shared memory."""
    pool = PagePool(8)
    seq = Sequence([5, 6, 7], SamplingParams())
    seq.pages = pool.allocate(1)
    batch = build_batch([(seq, 3)], 4, torch.device("cpu"))
    batch.feed_at(np.array([1, 2], dtype=np.int64), torch.tensor([40, 41]))
    assert batch.input_ids.tolist() == [5, 40, 41] and batch.ids_on_device
    assert batch.host[:3].tolist() == [5, 6, 7]
