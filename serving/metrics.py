"""What ``trt-latency serve`` exports on /metrics (prometheus_client, imported lazily: the serve extra).

One registry per server (never the process-global one), so two servers in one test process do not clash.
Names carry the ``trtl_`` prefix; times are milliseconds (as everywhere in this project), decision cost in ns.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

# ms buckets for TTFT and totals: a tiny CPU model's few ms up to a real model's tens of seconds
MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, float("inf"))
NS_BUCKETS = (100, 200, 500, 1000, 2000, 5000, 10000, 100000, float("inf"))
LAG_BUCKETS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, float("inf"))


class Percentiles:
    """p50 / p99 of the last ``n`` values (thread-safe): the decision cost and the handler's round trip."""

    def __init__(self, n: int = 10000) -> None:
        self._values: deque[float] = deque(maxlen=n)
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(float(value))

    def summary(self) -> dict[str, float | int | None]:
        with self._lock:
            arr = np.asarray(self._values, dtype=np.float64)
        if not arr.size:
            return {"n": 0, "p50": None, "p99": None}
        return {"n": int(arr.size), "p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


class ServeMetrics:
    """The server's counters, gauges and histograms on its own CollectorRegistry."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.decisions = Counter("trtl_decisions", "Admission decisions at arrival", ["outcome", "reason"], registry=r)
        self.bad_requests = Counter("trtl_bad_requests", "Requests refused with 400, by field", ["field"], registry=r)
        self.unavailable = Counter("trtl_unavailable", "Requests refused with 503 while draining", registry=r)
        self.finished = Counter("trtl_finished", "Admitted requests that left the engine", ["finish_reason"],
                                registry=r)
        self.slo_met = Counter("trtl_slo_met", "Admitted requests that completed within their SLO", registry=r)
        self.slo_violations = Counter("trtl_slo_violations", "Admitted requests that completed past their SLO",
                                      registry=r)
        self.tokens = Counter("trtl_generated_tokens", "Tokens generated", registry=r)
        self.predicted_ttft = Histogram("trtl_predicted_ttft_ms", "Predicted TTFT at admission (ms)",
                                        buckets=MS_BUCKETS, registry=r)
        self.observed_ttft = Histogram("trtl_observed_ttft_ms", "Observed TTFT from arrival (ms)", buckets=MS_BUCKETS,
                                       registry=r)
        self.predicted_total = Histogram("trtl_predicted_total_ms", "Predicted total at admission (ms)",
                                         buckets=MS_BUCKETS, registry=r)
        self.observed_total = Histogram("trtl_observed_total_ms", "Observed total from arrival (ms)",
                                        buckets=MS_BUCKETS, registry=r)
        self.decision_ns = Histogram("trtl_decision_ns", "Cost of one admission decision inside the server (ns)",
                                     buckets=NS_BUCKETS, registry=r)
        self.correction = Gauge("trtl_correction_factor", "Online correction factor per batch-size bucket",
                                ["batch_bucket"], registry=r)
        self.base_factor = Gauge("trtl_safety_factor", "Online safety factor (conformal quantile of scores)",
                                 registry=r)
        self.probes = Counter("trtl_probe_admissions", "Requests admitted as probes (factor 1, empty batch, nothing "
                              "admitted for the probe interval): how the online factor observes again", registry=r)
        self.expired_scores = Counter("trtl_expired_scores", "Online-factor scores dropped past the time horizon",
                                      registry=r)
        self.level = Gauge("trtl_quantile_level", "Level of the online factor's conformal quantile (alpha, or where "
                           "the adaptive step moved it)", registry=r)
        self.live_scores = Gauge("trtl_live_scores", "Scores the online factor is fitted on (within the horizon)",
                                 registry=r)
        self._seen = {"probes": 0, "expired_scores": 0}  # the controller's totals already counted
        self.running = Gauge("trtl_running_batch", "Requests in the engine's running batch", registry=r)
        self.queue = Gauge("trtl_queue_depth", "Admitted requests waiting for a KV slot", registry=r)
        self.steps = Counter("trtl_decode_steps", "Batched decode steps", registry=r)
        self.delivery_lag = Histogram("trtl_delivery_lag_ms", "From the engine's last token to the handler handing "
                                      "the response's end to the server (ms): the event loop's share of the "
                                      "latency the client sees", buckets=LAG_BUCKETS, registry=r)
        self.decide_ns = Percentiles()
        self.round_trip_ms = Percentiles()
        self.delivery_lag_ms = Percentiles()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def set_factors(self, counters: dict[str, Any]) -> None:
        """Gauges from BatchAdmissionController.counters()."""
        self.base_factor.set(float(counters.get("factor", 1.0)))
        self.live_scores.set(float(counters.get("scores", 0)))
        if counters.get("level") is not None:
            self.level.set(float(counters["level"]))
        for key, counter in (("probes", self.probes), ("expired_scores", self.expired_scores)):
            total = int(counters.get(key, 0))
            if total > self._seen[key]:
                counter.inc(total - self._seen[key])
                self._seen[key] = total
        for bucket, value in counters.get("correction_by_batch_bucket", {}).items():
            self.correction.labels(batch_bucket=bucket).set(float(value))
