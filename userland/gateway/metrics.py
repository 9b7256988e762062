"""GET /metrics: the kernel's numbers (its `metrics` syscall, the same counters `top`
and `sysinfo` show) and the gateway's own HTTP answers, in Prometheus' text format.

Kernel metrics are read at each scrape, not kept here (one owner: the kernel). Labels
are bounded: a model label per loaded model; a process label ("PID:NAME") for at most
the kernel's METRICS_PROCS busiest processes, the rest as "other"; the gateway's path
label only for its own routes.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


class Metrics:
    """The gateway's own counters, and the scrape (render)."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.http = Counter("llmos_http_requests", "HTTP requests answered, by path and status",
                            ["path", "status"], registry=self.registry)

    def answered(self, path: str, status: int) -> None:
        self.http.labels(path if path in ROUTES else "other", str(status)).inc()

    def render(self, k) -> str:
        """The scrape: the kernel's metrics (one syscall) and the gateway's. Blocking."""
        kernel = CollectorRegistry(auto_describe=False)
        kernel.register(_Kernel(k.metrics()))
        return (generate_latest(kernel) + generate_latest(self.registry)).decode()


class _Kernel:
    """One kernel Metrics record as Prometheus families."""

    def __init__(self, m):
        self.m = m

    def collect(self):
        models = self.m.models
        yield _counter("llmos_requests", "Requests finished, by model and finish reason",
                       ["model", "finish_reason"],
                       [([mm.model, r], n) for mm in models for r, n in sorted(mm.requests.items())])
        for field, what in (("prompt_tokens", "Prompt tokens of finished requests"),
                            ("computed_tokens", "Prompt tokens computed (not from the prefix cache)"),
                            ("generated_tokens", "Tokens generated"),
                            ("preemptions", "Requests preempted")):
            yield _counter(f"llmos_{field}", what, ["model"],
                           [([mm.model], getattr(mm, field)) for mm in models])
        yield _gauge("llmos_requests_running", "Requests in the engine's batch", ["model"],
                     [([mm.model], mm.running) for mm in models])
        yield _gauge("llmos_requests_waiting", "Requests accepted and not in the batch", ["model"],
                     [([mm.model], mm.waiting) for mm in models])
        yield _gauge("llmos_kv_blocks", "KV blocks by state (free includes evictable cached "
                     "blocks; swapped: in host swap or on disk)", ["model", "state"],
                     [([mm.model, state], n) for mm in models for state, n in (
                         ("total", mm.kv.total), ("used", mm.kv.used), ("cached", mm.kv.cached),
                         ("free", mm.kv.free), ("swapped", mm.swapped_blocks))])
        for name, field, what in (
                ("llmos_time_to_first_token_seconds", "ttft", "From acceptance to the first token"),
                ("llmos_time_per_output_token_seconds", "tpot", "Per output token after the first"),
                ("llmos_e2e_request_latency_seconds", "e2e", "From acceptance to the end")):
            family = HistogramMetricFamily(name, what, labels=["model"])
            for mm in models:
                h = getattr(mm, field)
                family.add_metric([mm.model], _buckets(h), sum_value=h.sum)
            yield family
        # Gauges, not counters: a process's figures leave with it, and "other" (the live
        # processes past the busiest) goes down when one exits or moves up.
        procs = [(f"{p.pid}:{p.name}", p) for p in self.m.procs] + [("other", self.m.others)]
        yield _gauge("llmos_process_tokens", "Tokens in (prompt) and out of each live "
                     "process so far", ["process", "direction"],
                     [([label, d], getattr(p, f"tokens_{d}")) for label, p in procs
                      for d in ("in", "out")])
        yield _gauge("llmos_process_requests", "Generate calls finished by each live process",
                     ["process"], [([label], p.requests) for label, p in procs])
        yield _gauge("llmos_uptime_seconds", "Seconds since the kernel booted", [],
                     [([], self.m.uptime)])


def _counter(name, what, labels, rows):
    family = CounterMetricFamily(name, what, labels=labels)
    for values, n in rows:
        family.add_metric(values, n)
    return family


def _gauge(name, what, labels, rows):
    family = GaugeMetricFamily(name, what, labels=labels)
    for values, n in rows:
        family.add_metric(values, n)
    return family


def _buckets(h) -> list[tuple[str, int]]:
    """A Histogram record's counts as Prometheus' cumulative buckets, +Inf last."""
    out, total = [], 0
    for bound, n in zip(list(h.bounds) + ["+Inf"], h.counts or [0] * (len(h.bounds) + 1)):
        total += n
        out.append((bound if isinstance(bound, str) else repr(float(bound)), total))
    return out
