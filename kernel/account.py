"""Accounts: the engine's view of a process: what it has received, what it may take.

An Account is what the scheduler ranks and charges; the kernel gives each process one
(`Proc.acct`) and passes it with every request and context of that process. A program
that runs the engine in-process may pass none: its requests share one anonymous account.

Who writes what:
  nice, limits        the I/O thread, under the process table's lock (one reference or
                      int assignment: the engine thread reads the latest value or the one
                      before, never a half-written one);
  everything else     the engine thread only (kernel/scheduler.py, kernel/vm.py); other
                      threads read the ints for ps and meminfo (a stale int is fine).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from llmos.syscalls.types import Limits

NICE_0_WEIGHT = 1024            # CFS: the weight of nice 0; each nice step is ~1.25x
KV_LIMIT = "kv_blocks limit"    # how every refusal for the kv_blocks limit begins (audited)


def nice_weight(nice: int) -> float:
    """CFS-like: nice 0 weighs 1024, each step down (nicer) 1.25x less."""
    return NICE_0_WEIGHT / (1.25 ** nice)


@dataclass(eq=False)
class Account:
    pid: int = 0
    nice: int = 0
    limits: Limits = field(default_factory=Limits)
    program: "Account | None" = None     # its process tree's root account (LAS); None: itself

    # Service received (engine thread).
    prompt_tokens: int = 0       # prompt tokens computed (cache hits not counted)
    generated_tokens: int = 0
    queued_s: float = 0.0        # time it had runnable work waiting and none in the batch
    running_s: float = 0.0       # time it had tokens in the batch
    preemptions: int = 0
    swaps: int = 0               # blocks moved out of the device pool (swap or disk)
    requests: int = 0            # requests that finished, however (kernel/metrics.py)
    program_service: float = 0.0  # (root accounts) the whole tree's tokens, each weighted
                                  # by its process's nice as fair does: LAS ranks by it
    vtc: float = 0.0             # the fair policy's weighted virtual token counter

    # Where its KV is now, in blocks (engine thread; see BlockTable.account).
    kv: dict = field(default_factory=lambda: {"device": 0, "host": 0, "disk": 0})

    # Engine-private.
    stopped: bool = False        # SIGSTOP: its work is not scheduled, its KV yields first
    bucket: float = 0.0          # tokens_per_s: tokens it may generate now
    bucket_at: float = 0.0       # time.monotonic() of the bucket's last refill

    @property
    def service(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def root(self) -> "Account":
        return self.program or self

    @property
    def weight(self) -> float:
        return nice_weight(self.nice)

    @property
    def resident(self) -> int:
        return self.kv["device"]

    def charge(self, prompt: int, generated: int) -> None:
        """Count service received in one step (the policies add their own counters)."""
        self.prompt_tokens += prompt
        self.generated_tokens += generated
        self.root.program_service += (prompt + generated) * NICE_0_WEIGHT / self.weight

    # ---- tokens_per_s: a token bucket ------------------------------------------------
    def may_generate(self, now: float | None = None) -> bool:
        """Whether its limit lets it generate a token now (always, without a limit)."""
        rate = self.limits.tokens_per_s
        if rate is None:
            return True
        now = time.monotonic() if now is None else now
        burst = max(rate, 1.0)           # at most one second's worth saved up
        if self.bucket_at == 0.0:
            self.bucket, self.bucket_at = burst, now
        self.bucket = min(burst, self.bucket + (now - self.bucket_at) * rate)
        self.bucket_at = now
        return self.bucket >= 1.0

    def spend(self, tokens: int) -> None:
        if self.limits.tokens_per_s is not None:
            self.bucket -= tokens

    def refill_in(self) -> float:
        """Seconds until may_generate() turns true (0 without a limit)."""
        rate = self.limits.tokens_per_s
        if rate is None or self.bucket >= 1.0:
            return 0.0
        return (1.0 - self.bucket) / rate
