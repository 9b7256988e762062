"""A synthetic agentic workload through the kernel, for every scheduling policy, with KV
paging on and off.

    .venv/bin/python bench/agent_workload.py [--agents 48] [--kv-memory 4M] [--kv-swap 16M]
                                             [--seed 0]
                                             [--policies fifo,priority,fair,las]
                                             [--paging on,off] [--repeat 1] [--quick]

What runs: N agent programs (threads in this process, each with its own `connect(home)`,
so each is its own kernel process to the scheduler). Each opens a context on the same
~200-token system prompt (share group "agents", so the prompt's KV can be shared) and runs
2-8 turns on it: a user message of random token ids, then a reply of exactly max_tokens
(ignore_eos, greedy), then a random "tool" pause of 10-500 ms before the next turn. About
two thirds are short programs (2-3 turns, 4-16 token replies) and one third long ones
(6-8 turns, 16-40 token replies); a program stops early when its next turn would not fit
below the model's 512-token context. Programs arrive at random over the first --ramp
seconds. The workload is drawn from --seed, so every configuration runs exactly the same
programs (same tokens, same pauses, same arrival times).

Each configuration (policy x paging) runs on a fresh kernel with a small KV pool
(--kv-memory 4M = 128 blocks of 16 tokens on tiny; the contexts of all programs need
several times that), so memory pressure is real. Paging off is `--no-kv-paging` where the
kernel has it; otherwise `--kv-ttl 1e9` (idle contexts are never paged out by age, only
when nothing at all could run: see the note printed).

Measured per configuration:
  completion   a program's time from its arrival to the end of its last turn (tool pauses
               included, which are the same everywhere): mean and p99 over the programs
               that finished every turn;
  tok/s        tokens generated (sysinfo, delta over the run) / wall time of the run;
  prefill      sysinfo computed_tokens - generated_tokens, delta over the run: the prompt
               tokens the engine actually computed (contexts keep their KV, so a turn
               computes only its new tokens unless its KV was dropped);
  stateless    what a server that recomputes each turn's whole conversation would compute:
               the sum over all turns run of (context length before the turn + the new
               user tokens); `x` is stateless / prefill;
  failed       calls that raised (ENOMEM, ETIMEDOUT, ...; by code): a program stops at
               its first failed turn and is not counted in completion;
  preempt, swaps   sysinfo preemptions (delta), and the sum of ps `swaps` (KV blocks
               moved out to host swap or disk) of the programs;
  peak swap/disk   the most KV blocks in host swap / on disk at once (meminfo, sampled
               every 0.25 s).
Then ratios against fifo with the same paging setting (mean completion fifo/policy,
throughput policy/fifo), and the goals: the best policy has >= 2x lower mean completion
than fifo at >= 0.9x its throughput; prefill >= 5x below stateless. Nothing is asserted.
All programs run at nice 0, so priority is fifo plus aging here.

Noise: on a shared 2-core box one configuration's figures vary by 2x from run to run.
--repeat N runs N rounds over all configurations, interleaved (so a busy spell hits them
all alike), and shows the median of each figure. Each kernel runs with OMP_NUM_THREADS=1
(--threads; see bench/benchkit.py for why).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (close_all, goal, has_flag, kernel, kernel_help, load_line, mean,  # noqa: E402
                      percentile)
from llmos.userland import SyscallError, connect  # noqa: E402

console = Console(width=160)
MAX_LEN = 512          # tiny's context length
SHARE = "agents"       # the prefix-cache share group of every program's context
SYSTEM = (
    "You are a careful software agent inside an operating system for language model "
    "agents. Tools: read a file, write a file, run a shell command, search the web, ask "
    "another agent. Say which tool you use and why; keep answers short. Never invent a "
    "result you did not get from a tool. When done, reply DONE and a summary.")


@dataclasses.dataclass
class Turn:
    pause: float            # s of "tool" time before this turn (0 for the first)
    user: list[int]         # the new tokens of this turn
    max_tokens: int
    prompt_len: int         # the whole conversation this turn's prompt is (stateless cost)


@dataclasses.dataclass
class Program:
    idx: int
    kind: str               # "short" or "long"
    arrival: float          # s after the start
    turns: list[Turn]


def make_workload(n: int, seed: int, ramp: float, base_len: int, vocab: int,
                  quick: bool = False) -> list[Program]:
    """n programs drawn from seed; base_len: the tokens of a fresh context (system prompt)."""
    rng = random.Random(seed)
    programs = []
    for i in range(n):
        long = rng.random() < 1 / 3
        turns_wanted = rng.randint(6, 8) if long else rng.randint(2, 3)
        if quick:
            turns_wanted = min(turns_wanted, 4)
        arrival = rng.uniform(0, ramp)
        ctx_len, turns = base_len, []
        for t in range(turns_wanted):
            user = [rng.randrange(10, vocab) for _ in range(rng.randint(8, 24))]
            out = rng.randint(16, 40) if long else rng.randint(4, 16)
            pause = 0.0 if t == 0 else rng.uniform(0.010, 0.500)
            if ctx_len + len(user) + out > MAX_LEN - 2:     # the next turn would not fit
                break
            turns.append(Turn(pause, user, out, ctx_len + len(user)))
            ctx_len += len(user) + out
        programs.append(Program(i, "long" if long else "short", arrival, turns))
    return programs


@dataclasses.dataclass
class Outcome:
    done: bool = False
    start: float = 0.0
    end: float = 0.0
    turns_run: int = 0
    stateless: int = 0      # prompt tokens of the turns run, recomputed from scratch
    failures: list = dataclasses.field(default_factory=list)   # error codes
    messages: list = dataclasses.field(default_factory=list)   # their messages


def run_program(k, prog: Program, t0: float, out: Outcome, call_timeout: float) -> None:
    delay = t0 + prog.arrival - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    out.start = t0 + prog.arrival
    ctx = None
    try:
        ctx = k.context(system=SYSTEM, share=SHARE)
        for turn in prog.turns:
            if turn.pause:
                time.sleep(turn.pause)
            ctx.generate(token_ids=turn.user, max_tokens=turn.max_tokens, ignore_eos=True,
                         temperature=0)
            out.turns_run += 1
            out.stateless += turn.prompt_len
        out.done = True
    except SyscallError as e:
        out.failures.append(e.code)
        out.messages.append(str(e))
    except Exception as e:          # noqa: BLE001 - count it, do not crash the benchmark
        out.failures.append(type(e).__name__)
        out.messages.append(repr(e))
    finally:
        out.end = time.monotonic()
        if ctx is not None:
            try:
                ctx.close()
            except Exception as e:  # noqa: BLE001
                out.failures.append(f"close:{getattr(e, 'code', type(e).__name__)}")


def probe(home) -> tuple[int, int]:
    """(tokens of a fresh context on SYSTEM, the model's vocabulary size)."""
    with connect(home, timeout=60) as k:
        with k.context(system=SYSTEM, share=SHARE) as ctx:
            base = ctx.info().tokens
        return base, k.models()[0].vocab


def run_config(args, policy: str, paging: str, off_flags: list[str], programs) -> dict:
    flags = ["--kv-memory", args.kv_memory, "--sched", policy] + \
        (["--kv-swap", args.kv_swap] if args.kv_swap else []) + \
        (off_flags if paging == "off" else [])
    label = f"{policy:8} paging {paging:3}"
    with kernel(*flags, label=label, threads=args.threads) as (home, _):
        k0 = connect(home, timeout=60)
        conns = []
        try:
            conns = [connect(home, timeout=args.call_timeout) for _ in programs]
            k0.generate(token_ids=[11, 12, 13], max_tokens=2)          # warm-up
            before = k0.sysinfo()
            outcomes = [Outcome() for _ in programs]
            t0 = time.monotonic() + 0.2
            threads = [threading.Thread(target=run_program, daemon=True,
                                        args=(c, p, t0, o, args.call_timeout))
                       for c, p, o in zip(conns, programs, outcomes)]
            for th in threads:
                th.start()
            peak_swapped = peak_disk = 0
            deadline = t0 + args.deadline
            while any(th.is_alive() for th in threads) and time.monotonic() < deadline:
                mem = k0.meminfo()
                peak_swapped = max(peak_swapped, mem.kv.swap_total - mem.kv.swap_free)
                peak_disk = max(peak_disk, mem.disk_used)
                time.sleep(0.25)
            for th in threads:
                th.join(max(0.0, deadline - time.monotonic()) + args.call_timeout + 5)
            stuck = sum(th.is_alive() for th in threads)
            after = k0.sysinfo()
            mypids = {c.pid for c in conns}
            rows = [r for r in k0.ps() if r.pid in mypids]
        finally:
            close_all(conns)
            k0.close()
    done = [o for o in outcomes if o.done]
    times = [o.end - o.start for o in done]
    wall = max(o.end for o in outcomes) - t0
    generated = after.generated_tokens - before.generated_tokens
    prefill = (after.computed_tokens - before.computed_tokens) - generated
    stateless = sum(o.stateless for o in outcomes)
    fails = collections.Counter(c for o in outcomes for c in o.failures)
    res = dict(policy=policy, paging=paging, done=len(done), total=len(programs),
               stuck=stuck, mean=mean(times), p99=percentile(times, 99),
               short=mean(o.end - o.start for o, p in zip(outcomes, programs)
                          if o.done and p.kind == "short"),
               long=mean(o.end - o.start for o, p in zip(outcomes, programs)
                         if o.done and p.kind == "long"),
               tps=generated / wall, wall=wall, generated=generated, prefill=prefill,
               stateless=stateless, fails=fails,
               preempt=after.preemptions - before.preemptions,
               swaps=sum(r.swaps for r in rows), peak_swapped=peak_swapped, peak_disk=peak_disk)
    console.print(f"  {label}: {res['done']}/{res['total']} programs done in {wall:.1f}s, "
                  f"mean {res['mean']:.2f}s p99 {res['p99']:.2f}s, {res['tps']:.0f} tok/s, "
                  f"prefill {prefill} (stateless {stateless}), failed {dict(fails) or 0}, "
                  f"preemptions {res['preempt']}, swaps {res['swaps']}", highlight=False)
    for msg in sorted({m for o in outcomes for m in o.messages})[:4]:
        console.print(f"    failed: {msg[:200]}", highlight=False, markup=False)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=48)
    ap.add_argument("--kv-memory", default=None,
                    help="KV pool of each kernel (default 4M; 2M with --quick)")
    ap.add_argument("--kv-swap", default=None,
                    help="host swap pool of each kernel (default: the kernel's, half the pool)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ramp", type=float, default=3.0, help="s over which programs arrive")
    ap.add_argument("--policies", default="fifo,priority,fair,las")
    ap.add_argument("--paging", default="on,off", help="on, off or on,off")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all configurations (interleaved); medians are shown")
    ap.add_argument("--call-timeout", type=float, default=120.0, help="s per call at most")
    ap.add_argument("--deadline", type=float, default=180.0, help="s per configuration at most")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of each kernel (0: torch's default; see benchkit.py)")
    ap.add_argument("--quick", action="store_true",
                    help="a ~1 min smoke run: 16 programs of at most 4 turns, fifo and las, "
                         "a 2M pool")
    args = ap.parse_args()
    args.threads = args.threads or None
    if args.kv_memory is None:
        args.kv_memory = "2M" if args.quick else "4M"
    if args.quick:
        args.agents, args.ramp = min(args.agents, 16), 1.5
        if args.policies == ap.get_default("policies"):
            args.policies = "fifo,las"
    policies = args.policies.split(",")
    pagings = args.paging.split(",")

    help_text = kernel_help()
    if has_flag("--no-kv-paging", help_text):
        off_flags, off_note = ["--no-kv-paging"], "paging off = --no-kv-paging"
    else:
        off_flags = ["--kv-ttl", "1e9"]
        off_note = ("paging off = --kv-ttl 1e9 (this kernel has no --no-kv-paging): idle "
                    "contexts are not paged out by age, but still are when nothing could run")
    console.print(f"[bold]agent workload[/bold]: {args.agents} programs, seed {args.seed}, "
                  f"--kv-memory {args.kv_memory}; {off_note}")
    console.print(f"machine: {load_line()}", highlight=False)

    with kernel("--kv-memory", args.kv_memory, label="probe", threads=args.threads) as (home, _):
        base_len, vocab = probe(home)
    programs = make_workload(args.agents, args.seed, args.ramp, base_len, vocab, args.quick)
    kinds = collections.Counter(p.kind for p in programs)
    n_turns = sum(len(p.turns) for p in programs)
    ctx_tokens = [p.turns[-1].prompt_len + p.turns[-1].max_tokens if p.turns else base_len
                  for p in programs]
    console.print(f"workload: {kinds['short']} short + {kinds['long']} long programs, "
                  f"{n_turns} turns, {sum(t.max_tokens for p in programs for t in p.turns)} "
                  f"tokens to generate; system prompt {base_len} tokens; final contexts "
                  f"{sum(ctx_tokens)} tokens = {sum(-(-c // 16) for c in ctx_tokens)} blocks "
                  f"(pool {args.kv_memory})", highlight=False)

    runs: dict[tuple, list] = {(pol, pag): [] for pag in pagings for pol in policies}
    for round_ in range(args.repeat):
        if args.repeat > 1:
            console.print(f"round {round_ + 1} of {args.repeat}")
        for paging in pagings:
            for policy in policies:
                try:
                    runs[policy, paging].append(
                        run_config(args, policy, paging, off_flags, programs))
                except Exception as e:       # noqa: BLE001 - report it, go on with the next
                    console.print(f"  [red]{policy} paging {paging} failed: {e!r}[/red]")
    console.print(f"machine: {load_line()}", highlight=False)
    report([combine(r) for r in runs.values() if r], args)


def combine(runs: list[dict]) -> dict:
    """One row of repeated runs of a configuration: the median of each figure, failures
    summed, programs done the fewest of any run."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and key not in ("done", "total", "stuck"):
            out[key] = statistics.median(r[key] for r in runs)
    out["done"] = min(r["done"] for r in runs)
    out["fails"] = sum((r["fails"] for r in runs), collections.Counter())
    return out


def report(results: list[dict], args) -> None:
    rounds = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
    table = Table(title=f"{args.agents} agent programs, --kv-memory {args.kv_memory}, "
                        f"seed {args.seed}{rounds}: completion s (mean / p99), tok/s, "
                        f"prefill tokens")
    for col in ("policy", "paging", "done", "mean", "p99", "short", "long", "tok/s",
                "prefill", "stateless", "x", "failed", "preempt", "swaps", "peak swap/disk",
                "mean vs fifo", "tok/s vs fifo"):
        table.add_column(col, justify="right")
    fifo = {r["paging"]: r for r in results if r["policy"] == "fifo"}
    for r in results:
        f = fifo.get(r["paging"])
        fails = ",".join(f"{c}:{n}" for c, n in sorted(r["fails"].items())) or "0"
        table.add_row(r["policy"], r["paging"], f"{r['done']}/{r['total']}",
                      f"{r['mean']:.2f}", f"{r['p99']:.2f}", f"{r['short']:.2f}",
                      f"{r['long']:.2f}", f"{r['tps']:.0f}", f"{r['prefill']:.0f}",
                      f"{r['stateless']:.0f}", f"{r['stateless'] / max(1, r['prefill']):.1f}x",
                      fails, f"{r['preempt']:.0f}", f"{r['swaps']:.0f}",
                      f"{r['peak_swapped']:.0f}/{r['peak_disk']:.0f}",
                      f"{f['mean'] / r['mean']:.2f}x" if f else "-",
                      f"{r['tps'] / f['tps']:.2f}x" if f else "-")
    console.print(table)

    goals = Table(title="goals")
    for col in ("paging", "goal", "figure", "result"):
        goals.add_column(col)
    for paging, f in fifo.items():
        others = [r for r in results if r["paging"] == paging and r["policy"] != "fifo"
                  and r["done"] == r["total"]]
        if others and f["done"] == f["total"]:
            best = min(others, key=lambda r: r["mean"])
            speed, thr = f["mean"] / best["mean"], best["tps"] / f["tps"]
            goals.add_row(paging, "best policy: >= 2x lower mean completion than fifo at "
                          ">= 0.9x its throughput",
                          f"{best['policy']}: {speed:.2f}x lower, {thr:.2f}x throughput",
                          goal(speed >= 2 and thr >= 0.9))
        else:
            goals.add_row(paging, "best policy vs fifo", "some programs did not finish",
                          goal(None))
    for r in results:
        ratio = r["stateless"] / max(1, r["prefill"])
        goals.add_row(r["paging"], f"{r['policy']}: prefill >= 5x below stateless",
                      f"{ratio:.1f}x ({r['prefill']:.0f} vs {r['stateless']:.0f})",
                      goal(ratio >= 5))
    console.print(goals)


if __name__ == "__main__":
    main()
