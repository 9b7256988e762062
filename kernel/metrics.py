"""Metrics: what each loaded model did since it loaded, and each process's LLM counters,
as the metrics syscall gives them (syscalls/types.py Metrics).

Units: seconds of the engine's scheduler clock (time.monotonic in the kernel) and tokens.
A request's latencies count from its acceptance by the engine (`Request.arrived`: when
the engine loop applied its Add, so tokenizing and a model's load come before it), to
its first output token (ttft), between its first and last tokens per token after the
first (tpot), and to its end, however it ended (e2e).

One owner for each number: a Meter holds only what nothing else counts (requests by how
they ended, the prompt tokens of finished requests, the histograms); generated tokens,
preemptions, KV and a process's tokens are read from the engine, its scheduler and pools,
and the process's Account, where they are kept anyway.

Threads: a Meter is its Engine's, written on the engine thread only (Engine.step and
_release). The engine loop copies every READY model's into each Snapshot
(`model_metrics`); the I/O thread reads that copy and the process table
(`proc_metrics`), never a Meter.
"""
from __future__ import annotations

from bisect import bisect_left

from llmos.syscalls.types import Histogram, KVInfo, ModelMetrics, ProcMetrics

from . import tunables

REASONS = ("stop", "length", "abort", "error")   # error: accepted, then failed (ENOMEM, EIO)


class Hist:
    """A histogram being filled: counts[i] of observations <= bounds[i] (and above the
    bound before), the last count those above every bound."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def record(self) -> Histogram:
        return Histogram(list(self.bounds), list(self.counts), self.sum, self.count)


class Meter:
    """One engine's requests by how they ended, the prompt tokens of those requests, and
    their latencies. Engine thread only."""

    def __init__(self):
        self.requests = dict.fromkeys(REASONS, 0)
        self.prompt_tokens = 0        # of finished requests, as their Usage says
        self.computed_tokens = 0      # ...of those, not found in the prefix cache
        self.ttft = Hist(tunables.TTFT_BUCKETS)
        self.tpot = Hist(tunables.TPOT_BUCKETS)
        self.e2e = Hist(tunables.E2E_BUCKETS)

    def first_token(self, req, now: float) -> None:
        """req (a kernel/request.py Request) got its first output token at `now`."""
        req.first_token_at = now
        self.ttft.observe(now - req.arrived)

    def finished(self, req, now: float) -> None:
        """req ended at `now`, however (once per request): counted for its model and its
        account; its latencies. tpot needs two tokens: one has no time between tokens."""
        reason = "error" if req.error is not None else req.finish_reason
        self.requests[reason] = self.requests.get(reason, 0) + 1
        usage = req.usage
        self.prompt_tokens += usage.prompt_tokens
        self.computed_tokens += usage.computed_tokens
        req.account.requests += 1
        self.e2e.observe(now - req.arrived)
        n = len(req.output_ids)
        if n >= 2 and req.first_token_at is not None:
            self.tpot.observe((now - req.first_token_at) / (n - 1))


def model_metrics(name: str, engine, kv: KVInfo) -> ModelMetrics:
    """engine's metrics now (engine thread), its pool being kv. Running: the live requests
    of the latest step while it has work; waiting: the rest of its live requests (queued,
    preempted, paged out, stopped, throttled)."""
    m = engine.meter
    running = sum(not r.finished for r in engine.last_batch) if engine.has_work() else 0
    return ModelMetrics(
        model=name, requests=dict(m.requests), prompt_tokens=m.prompt_tokens,
        computed_tokens=m.computed_tokens, generated_tokens=engine.stats["generated_tokens"],
        running=running, waiting=len(engine.requests) - running,
        preemptions=engine.scheduler.num_preemptions, kv=kv,
        swapped_blocks=kv.swap_total - kv.swap_free + engine.pager.usage()["disk_used"],
        ttft=m.ttft.record(), tpot=m.tpot.record(), e2e=m.e2e.record())


def proc_metrics(procs, n: int) -> tuple[list[ProcMetrics], ProcMetrics]:
    """(the n processes of `procs` (kernel/proc.py rows) with the most tokens in and out,
    busiest first; the rest summed as pid 0, "other"). Tokens are ps's: in, prompt tokens
    computed for it (cache hits not counted); out, tokens generated for it."""
    rows = sorted((ProcMetrics(p.pid, p.name, p.acct.requests, p.acct.prompt_tokens,
                               p.acct.generated_tokens) for p in procs),
                  key=lambda r: (-(r.tokens_in + r.tokens_out), r.pid))
    rest = rows[n:]
    return rows[:n], ProcMetrics(0, "other", sum(r.requests for r in rest),
                                 sum(r.tokens_in for r in rest),
                                 sum(r.tokens_out for r in rest))
