"""Prometheus metrics (names prefixed `tessera_`): the HTTP side's counters, and the gauges the engine
process last reported (at most 0.2 s old while it runs)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from tessera.server.engine_loop import AsyncEngine


class _EngineCollector:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        requests = CounterMetricFamily("tessera_requests", "Requests by outcome", labels=["outcome"])
        for outcome, count in e.requests.items():
            requests.add_metric([outcome], count)
        yield requests
        yield CounterMetricFamily("tessera_prompt_tokens", "Prompt tokens admitted", value=e.prompt_tokens)
        yield CounterMetricFamily("tessera_generation_tokens", "Tokens generated", value=e.generation_tokens)
        yield GaugeMetricFamily("tessera_num_requests_running", "Requests running", value=e.num_running)
        yield GaugeMetricFamily("tessera_num_requests_waiting", "Requests waiting", value=e.num_waiting)
        stats = e.stats
        usable = stats["pages_usable"]
        # NOTE: prefix-cache pages no request uses are evictable, not in use: counted as used, they kept
        # the gauge at 0.13-0.18 with every request done, indistinguishable from a leak
        in_use = usable - stats["pages_free"] - stats.get("pages_evictable", 0)
        yield GaugeMetricFamily("tessera_kv_cache_usage", "Fraction of KV pages in use by requests",
                                value=in_use / usable)  # fmt: skip
        yield GaugeMetricFamily("tessera_kv_cache_prefix_usage",
                                "Fraction of KV pages held by the prefix cache (shared or evictable)",
                                value=stats["pages_cached"] / usable)  # fmt: skip
        yield GaugeMetricFamily("tessera_kv_cache_evictable_usage",
                                "Fraction of KV pages held by the prefix cache for no request (evictable)",
                                value=stats.get("pages_evictable", 0) / usable)  # fmt: skip
        yield CounterMetricFamily("tessera_preemptions", "Requests preempted (KV cache full) and recomputed",
                                  value=stats["preemptions"])  # fmt: skip
        yield GaugeMetricFamily(
            "tessera_prefix_cache_hit_rate",
            "Prompt tokens served from the cache",
            value=stats["prefix_hit_rate"],
        )
        yield CounterMetricFamily("tessera_engine_steps", "Engine steps (forwards)", value=stats["steps"])
        phases = CounterMetricFamily(
            "tessera_engine_step_seconds",
            "Engine host seconds by step phase: schedule, propose (speculative drafting), forward (batch "
            "building and launches), sample (waits for the GPU), update",
            labels=["phase"],
        )
        for phase, seconds in stats["step_seconds"].items():
            phases.add_metric([phase], seconds)
        yield phases
        yield from _graph_metrics(stats["graphs"])
        yield from _speculative_metrics(stats.get("spec_accepted", []))


def _speculative_metrics(accepted: list[int]) -> Iterator[Metric]:
    """Accepted draft tokens per verify as a histogram (bucket le=k: verifies that accepted at most k);
    the mean acceptance length is 1 + sum / count."""
    if len(accepted) < 2:  # no speculative decoding
        return
    cumulative = [sum(accepted[: k + 1]) for k in range(len(accepted))]
    buckets = [(str(k), c) for k, c in enumerate(cumulative)] + [("+Inf", cumulative[-1])]
    total = sum(k * n for k, n in enumerate(accepted))
    yield HistogramMetricFamily(
        "tessera_spec_accepted_draft_tokens",
        "Draft tokens accepted per speculative verify",
        buckets=buckets,
        sum_value=total,
    )


def _graph_metrics(stats: dict) -> Iterator[Metric]:
    replays = CounterMetricFamily(
        "tessera_graph_replays",
        "Graph replays by kind (piecewise, full-decode, full-extend) and padded token count",
        labels=["kind", "size"],
    )
    for kind, sizes in stats.get("replays", {}).items():
        for size, count in sizes.items():
            replays.add_metric([kind, str(size)], count)
    yield replays
    fallbacks = CounterMetricFamily(
        "tessera_graph_eager_fallbacks",
        "Eager forwards by reason (disabled: graphs off; oversize: above the largest capture)",
        labels=["reason"],
    )
    for reason, count in stats.get("eager_fallbacks", {}).items():
        fallbacks.add_metric([reason], count)
    yield fallbacks
    yield CounterMetricFamily(
        "tessera_graph_padded_tokens", "Padding rows replayed", value=stats.get("padded_tokens", 0)
    )
    yield CounterMetricFamily(
        "tessera_graph_real_tokens", "Real rows of every forward", value=stats.get("real_tokens", 0)
    )


def metrics_response(engine: AsyncEngine) -> Response:
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
