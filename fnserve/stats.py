"""Exact statistics under concurrency: one lock, one source for /stats and /metrics.

The Prometheus collector reads the same counters as /stats, so the two can never
disagree, and no second set of locks sits on the request path.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
           float("inf"))

@dataclass
class Counters:
    active: int = 0
    success: int = 0
    failed: int = 0
    rejected: int = 0
    timeouts: int = 0
    total_us: int = 0
    duration_sum: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))

    def as_dict(self) -> dict[str, Any]:
        completed = self.success + self.failed
        total_ms = self.total_us / 1000
        return {
            "active_requests": self.active,
            "total_requests": self.active + self.success + self.failed + self.rejected,
            "success_requests": self.success,
            "failed_requests": self.failed,
            "rejected_requests": self.rejected,
            "timeouts": self.timeouts,
            "total_execution_ms": round(total_ms, 3),
            "average_execution_ms": round(total_ms / completed, 3) if completed else 0,
        }


class Stats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all = Counters()
        self._functions: dict[str, Counters] = {}

    def _both(self, function: str) -> tuple[Counters, Counters]:
        counters = self._functions.get(function)
        if counters is None:
            counters = self._functions[function] = Counters()
        return self._all, counters

    def admitted(self, function: str) -> None:
        with self._lock:
            for counters in self._both(function):
                counters.active += 1

    def rejected(self, function: str) -> None:
        with self._lock:
            for counters in self._both(function):
                counters.rejected += 1
                counters.outcomes["rejected"] = counters.outcomes.get("rejected", 0) + 1

    def finished(self, function: str, outcome: str, duration: float) -> None:
        micros = int(duration * 1_000_000)
        bucket = next(i for i, bound in enumerate(BUCKETS) if duration <= bound)
        with self._lock:
            for counters in self._both(function):
                counters.active -= 1
                if outcome == "ok":
                    counters.success += 1
                else:
                    counters.failed += 1
                if outcome == "timeout":
                    counters.timeouts += 1
                counters.total_us += micros
                counters.duration_sum += duration
                counters.outcomes[outcome] = counters.outcomes.get(outcome, 0) + 1
                counters.buckets[bucket] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            body = self._all.as_dict()
            body["functions"] = {name: c.as_dict() for name, c in sorted(self._functions.items())}
        return body

    def _copies(self) -> tuple[Counters, dict[str, Counters]]:
        with self._lock:
            copy = {name: Counters(outcomes=dict(c.outcomes), buckets=list(c.buckets),
                                   duration_sum=c.duration_sum)
                    for name, c in self._functions.items()}
            return Counters(active=self._all.active), copy


class StatsCollector(Collector):
    """Prometheus view of Stats: requests_total, the duration histogram, active gauge."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        overall, functions = self.stats._copies()
        requests = CounterMetricFamily("fnserve_requests", "Invocations by function and outcome.",
                                       labels=["function", "outcome"])
        durations = HistogramMetricFamily("fnserve_request_duration_seconds",
                                          "Invocation duration, admission to result.",
                                          labels=["function"])
        for name, counters in sorted(functions.items()):
            for outcome, count in sorted(counters.outcomes.items()):
                requests.add_metric([name, outcome], count)
            cumulative, running = [], 0
            for bound, count in zip(BUCKETS, counters.buckets, strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            if running:
                durations.add_metric([name], cumulative, counters.duration_sum)
        yield requests
        yield durations
        yield GaugeMetricFamily("fnserve_active_requests", "Invocations running now.",
                                value=overall.active)
