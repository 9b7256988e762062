"""Scheduling policies: which request runs first, and which yields when room runs out.

A policy ranks requests; the scheduler (kernel/scheduler.py) does the rest in rank order:
  - admission: waiting requests are admitted best rank first;
  - the step's token budget: running requests take it best rank first (decodes before
    prefill chunks), so a worse-ranked prefill is the one that waits for the next step;
  - preemption: when the pool or the seats run out, the worst-ranked running request that
    is not in the batch yet yields (a stopped one before any); a policy that `displaces`
    also lets a waiting request take the seat and blocks of a running one it outranks by
    more than `margin` (fifo never does: it only preempts for room).
Ties go to the request that arrived first, so a process's own calls run in its order.

Every policy bounds how long a request can wait: fifo by arrival; priority and las by
aging (a waiting request's rank improves by one level every AGING_S seconds since it
arrived, until it outranks anything newer); fair by its virtual counters (a backlogged
process's counter stays within a bound of the others', so it is served within a bound).

Ranks are read fresh each step (nice and service change); policies keep their own state
on the Account (kernel/account.py). Engine thread only.
"""
from __future__ import annotations

import math

from . import tunables
from .account import NICE_0_WEIGHT, Account


class Policy:
    name = ""
    displaces = False          # a waiting request may preempt a running one it outranks
    margin = 0.0               # ...by more than this much

    def rank(self, req, now: float) -> float:
        """Lower runs first. `req.arrived` (time.monotonic) and `req.account` are set."""
        raise NotImplementedError

    def backlogged(self, acct: Account, active) -> None:
        """acct has work again (its first live request), beside the accounts in `active`."""

    def charged(self, acct: Account, prompt: int, generated: int) -> None:
        """acct received service in one step (acct.charge has counted it)."""


class Fifo(Policy):
    """First come, first served: the order calls arrived in."""
    name = "fifo"

    def rank(self, req, now):
        return req.arrived


def _aged(level: float, req, now: float) -> float:
    return level - (now - req.arrived) / tunables.AGING_S


class Priority(Policy):
    """Nice as a static priority (-20 first), aged: every AGING_S seconds a request has
    waited since it arrived lift it one nice level."""
    name = "priority"
    displaces, margin = True, 1.0

    def rank(self, req, now):
        return _aged(req.account.nice, req, now)


class Fair(Policy):
    """Virtual token counters (VTC, OSDI'24): each process's counter grows by the tokens it
    receives (prompt tokens weigh FAIR_PROMPT_WEIGHT, generated ones FAIR_OUTPUT_WEIGHT)
    divided by its nice weight (CFS: nice 0 = 1024, each step ~1.25x); the process with the
    smallest counter runs first. A process that becomes backlogged is lifted to the smallest
    counter of the active ones, so idling earns no credit to flood with later."""
    name = "fair"
    displaces, margin = True, tunables.FAIR_MARGIN

    def rank(self, req, now):
        return req.account.vtc

    def backlogged(self, acct, active):
        counters = [a.vtc for a in active if a is not acct]
        if counters:
            acct.vtc = max(acct.vtc, min(counters))

    def charged(self, acct, prompt, generated):
        cost = tunables.FAIR_PROMPT_WEIGHT * prompt + tunables.FAIR_OUTPUT_WEIGHT * generated
        acct.vtc += cost * NICE_0_WEIGHT / acct.weight


class LeastAttained(Policy):
    """Program-level least attained service (Autellix's PLAS): a call ranks by the service
    its whole program (its process tree) has received so far, in levels that double
    (LAS_QUANTUM tokens, then 2x, 4x, ...), so a short agent program is not stuck behind
    long ones; aged like priority against starvation. Service is weighted by nice as in
    fair (a nice 5 process's token counts ~3x), so nice matters here too."""
    name = "las"
    displaces, margin = True, 1.0

    def rank(self, req, now):
        level = math.floor(math.log2(1 + req.account.root.program_service / tunables.LAS_QUANTUM))
        return _aged(level, req, now)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Fifo, Priority, Fair, LeastAttained)}


def make_policy(name: str) -> Policy:
    """The policy called name. Raises ValueError naming the ones there are."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"no scheduling policy {name!r} (there are: {', '.join(POLICIES)})") from None
