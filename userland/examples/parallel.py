"""Fan out: spawn one worker agent per task, wait for all, print what each answered.

The workers are real processes that the kernel schedules together (their generate calls
share batches). Each prints "RESULT <answer>" to its log; we read it after wait().
"""
import argparse
import sys
import time

from llmos.userland import connect

TASKS = ["12+47=", "38+57=", "64+89=", "reverse c a t =", "reverse l l m o s =",
         "reverse k e r n e l ="]


def result_of(k, pid: int) -> str:
    """The answer a finished worker printed, from its log ("?" if none)."""
    path = k.log_path(pid)
    try:
        lines = path.read_text().splitlines() if path else []
    except OSError:
        lines = []
    found = [ln.removeprefix("RESULT ") for ln in lines if ln.startswith("RESULT ")]
    return found[-1] if found else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-n", type=int, default=len(TASKS), help="number of workers")
    n = ap.parse_args(argv).n
    tasks = [TASKS[i % len(TASKS)] for i in range(n)]
    with connect() as k:
        start = time.perf_counter()
        pids = [k.spawn([sys.executable, "-m", "llmos.userland.examples.worker", task],
                        name=f"worker{i}") for i, task in enumerate(tasks)]
        failed = 0
        for pid, task in zip(pids, tasks):
            status = k.wait(pid, timeout=120)
            failed += status != 0
            print(f"pid {pid:>3}  {task:<22} -> {result_of(k, pid):<14} status {status}")
        print(f"{n} workers in {time.perf_counter() - start:.2f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
