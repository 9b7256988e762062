"""KV oversubscription: agents whose contexts total ~4x the device pool, checked turn by
turn against a kernel that holds everything.

    .venv/bin/python bench/oversubscribe.py [--agents 32] [--turns 4] [--kv-memory 2M]
                                            [--full-memory 32M] [--kv-disk 8M] [--quick]

What runs: --agents programs (threads, each its own connection = its own kernel process),
each with one context and --turns turns: the first turn sends 48 prompt tokens, each later
one 8 more, and each turn generates 16 tokens (ignore_eos, and the kernel's default
sampling, temperature 0: greedy), with a random 50-500 ms "tool" pause between turns. A
context ends at 48 + 16 + 3 x 24 = 136 tokens = 9 blocks of 16, so 32 agents hold ~288
blocks, 4.5x a --kv-memory 2M pool (64 blocks on tiny). The prompts and pauses come from
--seed, the same in every run.

Runs, each on a fresh kernel:
  unconstrained   --kv-memory 32M (1024 blocks): everything stays resident; the reference.
  host swap       --kv-memory 2M: idle contexts page out to the host swap pool (its size
                  has no flag: kernel/load.py makes it half the device pool, 32 blocks here),
                  and what does not fit there is dropped and recomputed on the next turn.
  swap + disk     --kv-memory 2M --kv-disk 8M: the same 32-block host pool, so most paged
                  contexts spill to the disk tier (HOME/kv). (The sim driver's
                  LLMOS_SIM_HOST_MEMORY caps what the swap pool may take, so boot fails
                  below 32 blocks; it does not shrink it, so it is not used here.)
  paging off      --kv-memory 2M --no-kv-paging (if the kernel has it): contexts stay
                  resident; calls that cannot get KV fail (counted).
For each: turns done, turns whose generated token ids equal the unconstrained run's / all
turns (the goal: all of them, in every paging run; with paging off, where an agent stops
at its first failed call, all of those done), failed calls, wall time and the slowdown against
the unconstrained run, prefill tokens computed (sysinfo computed - generated: the cost of
recomputing dropped KV), preemptions (sysinfo), KV blocks paged out (sum of ps `swaps`),
and the peak blocks in host swap and on disk (meminfo, sampled every 0.2 s). The default
--kv-ttl (3 s) is kept: contexts used within it page out only when nothing could run
otherwise; --kv-ttl passes another value to every run.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import close_all, goal, has_flag, kernel, kernel_help, load_line  # noqa: E402
from llmos.userland import SyscallError, connect  # noqa: E402

console = Console(width=150)
VOCAB = (10, 400)


def make_plan(agents: int, turns: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    plan = []
    for _ in range(agents):
        prompts = [[rng.randrange(*VOCAB) for _ in range(48 if t == 0 else 8)]
                   for t in range(turns)]
        pauses = [rng.uniform(0.05, 0.5) for _ in range(turns)]
        plan.append(dict(start=rng.uniform(0, 0.5), prompts=prompts, pauses=pauses))
    return plan


def agent(k, spec: dict, t0: float, new_tokens: int, outs: list, errors: list) -> None:
    time.sleep(max(0.0, t0 + spec["start"] - time.monotonic()))
    try:
        with k.context() as ctx:
            for t, prompt in enumerate(spec["prompts"]):
                if t:
                    time.sleep(spec["pauses"][t])
                done = ctx.generate(token_ids=prompt, max_tokens=new_tokens, ignore_eos=True)
                outs.append(list(done.token_ids))
    except SyscallError as e:
        errors.append(str(e))
    except Exception as e:      # noqa: BLE001 - count it, do not crash the benchmark
        errors.append(repr(e))


def run(name: str, flags: list[str], plan: list[dict], args) -> dict:
    with kernel(*flags, label=name, threads=args.threads) as (home, _):
        k0 = connect(home, timeout=60)
        conns = []
        try:
            conns = [connect(home, timeout=args.call_timeout) for _ in plan]
            k0.generate(token_ids=[11, 12, 13], max_tokens=2)          # warm-up
            outs = [[] for _ in plan]
            errors = [[] for _ in plan]
            before = k0.sysinfo()
            t0 = time.monotonic() + 0.2
            threads = [threading.Thread(target=agent, daemon=True,
                                        args=(c, s, t0, args.new_tokens, o, e))
                       for c, s, o, e in zip(conns, plan, outs, errors)]
            for th in threads:
                th.start()
            peak = collections.Counter()
            while any(th.is_alive() for th in threads):
                mem = k0.meminfo()
                peak["host"] = max(peak["host"], mem.kv.swap_total - mem.kv.swap_free)
                peak["disk"] = max(peak["disk"], mem.disk_used)
                peak["device"] = max(peak["device"], mem.kv.used)
                time.sleep(0.2)
            wall = time.monotonic() - t0
            after = k0.sysinfo()
            mem = k0.meminfo()
            mine = {c.pid for c in conns}
            rows = [r for r in k0.ps() if r.pid in mine]
        finally:
            close_all(conns)
            k0.close()
    generated = after.generated_tokens - before.generated_tokens
    res = dict(name=name, flags=" ".join(flags), outs=outs, errors=errors, wall=wall,
               prefill=after.computed_tokens - before.computed_tokens - generated,
               generated=generated, preempt=after.preemptions - before.preemptions,
               swaps=sum(r.swaps for r in rows), peak=peak, total=mem.kv.total,
               swap_total=mem.kv.swap_total, disk_total=mem.disk_total)
    nerr = sum(len(e) for e in errors)
    console.print(f"  {name} ({' '.join(flags)}): {wall:.1f}s, {res['total']} device blocks, "
                  f"swap {res['swap_total']}, disk {res['disk_total']}; prefill {res['prefill']}, "
                  f"preemptions {res['preempt']}, blocks paged out {res['swaps']}, peak host "
                  f"{peak['host']} disk {peak['disk']}; failed calls {nerr}", highlight=False)
    for msg in sorted({m for e in errors for m in e})[:3]:
        console.print(f"    failed: {msg[:200]}", highlight=False, markup=False)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--kv-memory", default="2M", help="the constrained pool (default 2M)")
    ap.add_argument("--full-memory", default="32M", help="the unconstrained pool")
    ap.add_argument("--kv-disk", default="8M", help="the disk tier of the swap + disk run")
    ap.add_argument("--kv-ttl", default=None, help="--kv-ttl of every kernel (default: its own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--call-timeout", type=float, default=180.0)
    ap.add_argument("--only", default=None,
                    help="comma-separated runs besides the unconstrained one, e.g. 'paging off'")
    ap.add_argument("--no-paging-off", action="store_true", help="skip the paging-off run")
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of each kernel (0: torch's default; see benchkit.py)")
    ap.add_argument("--quick", action="store_true",
                    help="a ~1 min smoke run: 16 agents, 3 turns, no paging-off run")
    args = ap.parse_args()
    args.threads = args.threads or None
    if args.quick:
        args.agents, args.turns, args.no_paging_off = min(args.agents, 16), 3, True
    plan = make_plan(args.agents, args.turns, args.seed)
    ctx_tokens = 48 + args.new_tokens + (args.turns - 1) * (8 + args.new_tokens)
    console.print(f"[bold]oversubscription[/bold]: {args.agents} agents x {args.turns} turns, "
                  f"contexts of {ctx_tokens} tokens = {-(-ctx_tokens // 16)} blocks each, "
                  f"{args.agents * -(-ctx_tokens // 16)} blocks in all; pool {args.kv_memory}")
    console.print(f"machine: {load_line()}", highlight=False)
    ttl = ["--kv-ttl", args.kv_ttl] if args.kv_ttl is not None else []
    runs = [("unconstrained", ["--kv-memory", args.full_memory] + ttl),
            ("host swap", ["--kv-memory", args.kv_memory] + ttl),
            ("swap + disk", ["--kv-memory", args.kv_memory, "--kv-disk", args.kv_disk] + ttl)]
    if args.only:
        keep = args.only.split(",")
        runs = [r for r in runs if r[0] == "unconstrained" or r[0] in keep]
    if not args.no_paging_off and (not args.only or "paging off" in args.only.split(",")):
        if has_flag("--no-kv-paging", kernel_help()):
            runs.append(("paging off", ["--kv-memory", args.kv_memory, "--no-kv-paging"] + ttl))
        else:
            console.print("  (this kernel has no --no-kv-paging: the paging-off run is skipped)")
    results = []
    for name, flags in runs:
        try:
            results.append(run(name, flags, plan, args))
        except Exception as e:       # noqa: BLE001 - report it, go on with the next
            console.print(f"  [red]{name} failed: {e!r}[/red]")
    console.print(f"machine: {load_line()}", highlight=False)
    if not results or results[0]["name"] != "unconstrained":
        console.print("[red]no unconstrained run to compare with[/red]")
        return
    ref = results[0]
    total = args.agents * args.turns
    table = Table(title=f"{args.agents} agents x {args.turns} turns x {args.new_tokens} tokens, "
                        f"greedy; outputs against the unconstrained run")
    for col in ("run", "device/swap/disk blocks", "turns done", "identical turns", "failed",
                "wall s",
                "slowdown", "prefill", "preempt", "paged out", "peak host", "peak disk",
                "goal: all identical"):
        table.add_column(col, justify="right")
    for r in results:
        same = sum(a == b for ro, rr in zip(r["outs"], ref["outs"]) for a, b in zip(ro, rr))
        nerr = sum(len(e) for e in r["errors"])
        paging = r["name"] not in ("unconstrained", "paging off")
        table.add_row(r["name"], f"{r['total']}/{r['swap_total']}/{r['disk_total']}",
                      f"{sum(len(o) for o in r['outs'])}/{total}", f"{same}/{total}", str(nerr),
                      f"{r['wall']:.1f}",
                      f"{r['wall'] / ref['wall']:.2f}x", str(r["prefill"]), str(r["preempt"]),
                      str(r["swaps"]), str(r["peak"]["host"]), str(r["peak"]["disk"]),
                      goal(same == total) if paging else
                      "" if r["name"] == "unconstrained" else
                      f"done ones: {goal(same == sum(len(o) for o in r['outs']))}")
    console.print(table)
    ref_done = sum(len(o) for o in ref["outs"])
    if ref_done != total:
        console.print(f"[red]the unconstrained run itself finished {ref_done}/{total} turns[/red]")


if __name__ == "__main__":
    main()
