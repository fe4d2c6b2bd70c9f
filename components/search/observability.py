"""What `zhclip serve` tells its operators: Prometheus metrics at /metrics and a JSON access log.

The metrics live in the service's own `CollectorRegistry` (not the process-global one), so two
services in one process (tests, a swap) never share counters. Names follow Prometheus' conventions:
`zhclip_search_` prefix, `_total` counters, `_seconds` histograms.

The access log is one JSON object per request line, on stdout or a file (`serve.access_log`): time,
method, endpoint (the route's template, so ids do not multiply log keys), status, duration, and the
model version and index that answered. The query text is left out unless `serve.log_queries` (queries
can be personal data).
"""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Request latency buckets, seconds: a query on CPU takes milliseconds to a few hundred of them.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """The service's counters, histograms and gauges, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "zhclip_search_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "zhclip_search_request_seconds",
            "Time to answer a request, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "zhclip_search_embed_batch_size",
            "Texts embedded together in one call of the model",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "zhclip_search_queue_wait_seconds",
            "Time a text query waited for the model before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model = Info("zhclip_search_model", "The live model and indexes", registry=self.registry)
        self.ready = Gauge("zhclip_search_ready", "1 when the model and indexes are loaded", registry=self.registry)
        self.checks = Counter(
            "zhclip_search_registry_checks",
            "Checks of the model URI, by outcome: loaded, swapped, unchanged, waiting, refused, error",
            ["outcome"],
            registry=self.registry,
        )
        self.swaps = Counter(
            "zhclip_search_swaps", "Times a new model and index replaced the live pair", registry=self.registry
        )
        self.refusals = Counter(
            "zhclip_search_refusals",
            "New models refused, by why: load (it or its index failed to load) or canary (recall fell)",
            ["reason"],
            registry=self.registry,
        )
        self.canary = Gauge(
            "zhclip_search_canary_recall",
            "Canary recall@10 (mean over indexes) of the live pair and of the last candidate checked",
            ["role"],
            registry=self.registry,
        )

    def live(self, identity: dict[str, Any], backend: str, indexes: dict[str, str]) -> None:
        """Record the model and indexes now answering (the info gauge's labels)."""
        self.model.info(
            {
                "uri": str(identity.get("uri") or ""),
                "name": str(identity.get("name") or ""),
                "version": str(identity.get("version") or ""),
                "weights_hash": str(identity.get("weights_hash") or "")[:12],
                "backend": backend,
                "indexes": ",".join(f"{name}={uri}" for name, uri in sorted(indexes.items())),
            }
        )
        self.ready.set(1)


class AccessLog:
    """One JSON line per request to `stream`; thread-safe (requests finish on many threads)."""

    def __init__(self, target: str, log_queries: bool) -> None:
        self.stream: TextIO | None = (
            None if not target else sys.stdout if target == "-" else open(target, "a", encoding="utf-8")
        )
        self.log_queries = log_queries
        self.lock = threading.Lock()

    def write(self, entry: dict[str, Any], query: str | None) -> None:
        if self.stream is None:
            return
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry}
        if self.log_queries and query is not None:
            record["query"] = query
        line = json.dumps(record, ensure_ascii=False)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()
