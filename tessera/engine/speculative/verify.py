"""Which draft tokens a verify accepts, so that the output is what decoding one token at a time gives.

A verify's rows of logits are the target's distributions at its last token and after each draft token,
each computed as if the drafts before it were accepted. Row j is sampled exactly as a plain decode
would sample it there (penalties over the output with the first j drafts appended, `min_tokens` bans
counted from there, temperature, top-k/p, min-p).

- Greedy: the drafts are accepted while each equals the target's choice; the target's choice at the
  first mismatch (or after the last draft) follows. The output is token for token the plain decode's.
- Sampling: speculative rejection sampling (Leviathan et al., 2023; Chen et al., 2023), in the form it
  takes for drafts drawn deterministically, as all proposers here draw them. The draft distribution q is
  then a point mass at the draft token d, so d is accepted with probability min(1, p(d) / q(d)) = p(d),
  and at the first rejection a token comes from the residual max(p - q, 0), p without d renormalized.
  Drawing x ~ p at the row and accepting d when x == d realizes exactly that: P(accept) = p(d), and a
  rejected row emits x ~ p conditioned on x != d, the residual. Every emitted token is distributed as p;
  and since row j draws with the generator a plain decode uses at that position (`Sequence.rng`), a
  seeded request emits the same tokens with speculation as without.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tessera.engine.sampling import (
    TopLogprobs,
    Verified,
    penalize,
    sample_row,
    top_logprobs,
)
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DeviceDrafts
from tessera.engine.stopping import StopChecker


def verify_batch(
    logits: torch.Tensor,
    seqs: list[Sequence],
    stops: StopChecker | None,
    drafts: DeviceDrafts | None = None,
    before_copy: Callable[[torch.Tensor], None] | None = None,
) -> list[Verified]:
    """Each sampling sequence's tokens from its rows of `logits` [sum(1 + drafts), V] (float32): one row
    for a plain decode or prefill end, 1 + K for a verify of K drafts, in `seqs`' order. `drafts`: the
    verifies' drafts if they are still on the device (the sequences hold placeholders): they come to the
    host with the choices, in one copy, and are written into the sequences. `before_copy`: called with
    the choice at every row, on the device, before the host waits for them (an EAGLE head queues its
    forward there)."""
    counts = [1 + len(s.draft_token_ids) for s in seqs]
    banned = [stops.banned(s) if stops is not None else () for s in seqs]
    all_logprobs = torch.log_softmax(logits, dim=-1)
    simple = all(s.params.plain and not ban for s, ban in zip(seqs, banned, strict=True))
    if drafts is not None and not simple:  # penalties read them
        drafts.resolve(drafts.tokens.tolist())
        drafts = None
    if simple:  # greedy, no penalty, no ban within the window: one argmax for the whole batch
        choices = torch.argmax(logits, dim=-1)
    else:
        choices = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        start = 0
        for seq, n in zip(seqs, counts, strict=True):
            choices[start : start + n] = _choose(logits[start : start + n], seq, stops)
            start += n
    if before_copy is not None:
        before_copy(choices)
    chosen_logprobs = all_logprobs.gather(1, choices[:, None])[:, 0]
    parts = [choices, chosen_logprobs] + ([drafts.tokens] if drafts is not None else [])
    host = torch.cat([p.to(torch.float64) for p in parts]).tolist()  # (float64: ids stay exact)
    rows = logits.shape[0]
    tokens, logprobs = [int(t) for t in host[:rows]], host[rows : 2 * rows]
    if drafts is not None:
        drafts.resolve([int(t) for t in host[2 * rows :]])
    out: list[Verified] = []
    start = 0
    for seq, n in zip(seqs, counts, strict=True):
        proposed = seq.draft_token_ids
        a = 0
        while a < n - 1 and tokens[start + a] == proposed[a]:
            a += 1
        kept = range(start, start + a + 1)
        out.append(Verified([tokens[r] for r in kept], [logprobs[r] for r in kept], [()] * (a + 1)))
        start += n
    _fill_top_logprobs(out, seqs, counts, all_logprobs)
    return out


def _choose(rows: torch.Tensor, seq: Sequence, stops: StopChecker | None) -> torch.Tensor:
    """One sequence's choice at each of its rows [n, V]: the token a plain decode would emit there.
    Greedy rows: the argmax after penalties and bans; sampling rows: a draw from p with the generator of
    that row's position. (The caller accepts the drafts while they equal these; rows past the first
    mismatch are never emitted.)"""
    p, drafts = seq.params, seq.draft_token_ids
    processed = rows
    if p.penalized or stops is not None:
        processed = rows.clone()
        for j in range(rows.shape[0]):
            row = rows[j]
            if p.penalized:
                row = penalize(row, p, seq.prompt_token_ids, seq.output_token_ids + drafts[:j])
            ban = stops.banned(seq, ahead=j) if stops is not None else ()
            if ban:
                row = row.index_fill(0, torch.tensor(ban, device=row.device), float("-inf"))
            processed[j] = row
    if p.greedy:
        return processed.argmax(dim=-1)
    # row by row, as the plain sampler draws them (the same probabilities, the same generator state)
    return torch.stack([sample_row(processed[j], p, seq.rng(j)) for j in range(rows.shape[0])])


def _fill_top_logprobs(
    out: list[Verified], seqs: list[Sequence], counts: list[int], all_logprobs: torch.Tensor
) -> None:
    """The alternatives of every emitted token of the sequences that asked for them."""
    rows: list[int] = []
    ks: list[int] = []
    start = 0
    for v, seq, n in zip(out, seqs, counts, strict=True):
        if seq.params.top_logprobs:
            rows += range(start, start + len(v.tokens))
            ks += [seq.params.top_logprobs] * len(v.tokens)
        start += n
    if not rows:
        return
    tops: list[TopLogprobs] = [()] * all_logprobs.shape[0]
    top_logprobs(tops, all_logprobs, rows, ks)
    start = 0
    for v, seq, n in zip(out, seqs, counts, strict=True):
        if seq.params.top_logprobs:
            v.tops = tops[start : start + len(v.tokens)]
        start += n
