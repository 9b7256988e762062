"""The audit log: HOME/log/audit.log, one JSON object a line per security-relevant event.

Every record has ts (epoch seconds), event, pid (the acting process; null before hello)
and uid (its peer uid by SO_PEERCRED; null when unknown, as on tcp, where the hello and
refusals of a CURVE connection carry key, its client's name on the allow-list), then:

    hello          os_pid, owner                  a connection became process pid
    hello_refused  os_pid, code, reason           a hello was refused (*)
    spawn          target, name, argv0, os_pid    pid started process target (*)
    signal         target, signal                 pid signalled target (*)
    denied         syscall, code, reason          EPERM or EACCES from any syscall (*);
                                                  before hello also os_pid
    limit          syscall, code, reason          EAGAIN or ENOMEM: a table, cap, budget or
                                                  a process's limit is full (*)
    setrlimit      target, limits                 pid set target's limits (*)
    sched          policy                         the owner switched the policy (*)
    share          syscall, group                 pid joined a prefix-cache share group (*)
    suppressed     of, syscall, code, count       (*) records of one key dropped in a period

(*) rate-limited: of one key (event, pid, uid, syscall, code) at most AUDIT_BURST are
written per AUDIT_PERIOD; the rest are counted in one `suppressed` record at the end of
the period. With rotation by size (kernel/logfile.py) that bounds what a flood of
refused hellos (or a process signalling itself in a loop) can write, and keeps it from
rotating older records away; only hellos are never limited.

Threads: any thread may record; a lock orders the records. Recording never raises: a
write that fails is said once in the kernel log (and once again when writing works).
"""
from __future__ import annotations

import json
import logging
import threading
import time

from . import tunables
from .logfile import LogFile

log = logging.getLogger("llmos.kernel")

NAME = "audit.log"
CLIP = 256                   # characters kept of a string field (argv0, reason, name, group)
_KEY = ("pid", "uid", "syscall", "code")


class AuditLog:
    def __init__(self, file: LogFile, burst: int = tunables.AUDIT_BURST,
                 period: float = tunables.AUDIT_PERIOD):
        self.burst, self.period = burst, period
        self._lock = threading.Lock()
        # Guarded by _lock.
        self.file: LogFile | None = file       # None once closed
        self._window = time.monotonic()        # when this rate-limit period began
        self._seen: dict[tuple, list] = {}     # key -> [written, dropped] in this period
        self._lost = 0                         # records lost since writing began to fail
        self._failing = False

    @classmethod
    def open(cls, log_dir) -> "AuditLog":
        """The audit log in log_dir (the home's log/), rotated by size. Raises OSError, or
        HomeError if audit.log is a symlink (someone planted it: the home is refused)."""
        return cls(LogFile(log_dir, NAME, tunables.AUDIT_LOG_MAX, tunables.AUDIT_LOG_KEEP))

    def record(self, event: str, *, limited: bool = False, **fields) -> None:
        """Append {ts, event, **fields}. limited: a refusal, subject to the rate limit.
        Never raises."""
        try:
            with self._lock:
                self._roll(time.monotonic())
                if limited and not self._admit(event, fields):
                    return
                self._write(event, fields)
        except Exception:                            # a bug here must not fail a syscall
            log.exception("audit log: cannot record %s", event)

    def tick(self) -> None:
        """End the rate-limit period if it is over (the kernel's timers call this)."""
        try:
            with self._lock:
                self._roll(time.monotonic())
        except Exception:
            log.exception("audit log: tick failed")

    def close(self) -> None:
        """Write what the rate limit held back, close the file. Later records are lost."""
        with self._lock:
            self._roll(float("inf"))
            if self.file is not None:
                self.file.close()
                self.file = None

    # ---- under _lock ----------------------------------------------------------------
    def _admit(self, event: str, fields: dict) -> bool:
        counts = self._seen.setdefault((event, *(fields.get(k) for k in _KEY)), [0, 0])
        if counts[0] < self.burst:
            counts[0] += 1
            return True
        counts[1] += 1
        return False

    def _roll(self, now: float) -> None:
        if now - self._window < self.period:
            return
        seen, self._seen, self._window = self._seen, {}, min(now, time.monotonic())
        for (event, *key), (_, dropped) in seen.items():
            if dropped:
                self._write("suppressed", {**dict(zip(_KEY, key)), "of": event,
                                           "count": dropped})

    def _write(self, event: str, fields: dict) -> None:
        rec = {"ts": round(time.time(), 6), "event": event,
               **{k: _clip(v) for k, v in fields.items()}}
        line = json.dumps(rec, separators=(",", ":"), default=str) + "\n"
        if self.file is None:
            return
        try:
            self.file.write(line.encode())
        except Exception as e:                       # OSError, HomeError (a planted link)
            self._lost += 1
            if not self._failing:
                self._failing = True
                log.error("audit log: cannot write %s: %s; records are lost until it can",
                          self.file.path, e)
            return
        if self._failing:
            self._failing = False
            log.warning("audit log: writing %s again; %d record(s) lost", self.file.path,
                        self._lost)
            self._lost = 0


def _clip(v):
    return v[:CLIP] + "..." if isinstance(v, str) and len(v) > CLIP else v
