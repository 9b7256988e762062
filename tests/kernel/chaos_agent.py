"""An agent of the chaos test (tests/kernel/test_chaos.py), run as a spawned process:

    python chaos_agent.py STOP_FILE SEED CALL_TIMEOUT VANISH_STATUS

Two threads make calls until STOP_FILE exists, each a random operation of its list.
Before an operation it prints "S <thread> <n> <op>"; when it returns or raises,
"E <thread> <n> <op> <ok, or the error code> <seconds>". Then it prints "done" and
exits 0. The kernel's SIGINT only aborts its calls (the process ignores it); about one
operation in 70 exits at once with VANISH_STATUS, whatever the other thread is doing.
"""
import os
import random
import signal
import sys
import threading
import time

from llmos.userland import SyscallError, connect

signal.signal(signal.SIGINT, signal.SIG_IGN)
STOP_FILE, SEED, CALL_TIMEOUT, VANISH = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4])
k = connect(timeout=CALL_TIMEOUT)
rng = random.Random(SEED)
out = threading.Lock()
kept = []        # contexts left open on purpose: the kernel frees them when we die


def say(*words):
    with out:
        print(*words, flush=True)


def call(tid: int, n: int, op) -> None:
    say("S", tid, n, op.__name__)
    t0 = time.monotonic()
    try:
        op()
        outcome = "ok"
    except SyscallError as e:          # KernelDead and CallTimeout included
        outcome = e.code
    except Exception as e:             # a broken answer
        outcome = "X-" + type(e).__name__
    say("E", tid, n, op.__name__, outcome, "%.2f" % (time.monotonic() - t0))


def stream():
    s = k.generate("12+47=", stream=True, max_tokens=rng.randint(1, 8))
    for _ in s:
        pass
    assert s.completion is not None


def cancel():
    # Abandoned after its first delta: the SDK cancels it (a short one may finish
    # first, and the cancel then finds nothing to cancel).
    with k.generate("reverse c a t =", stream=True, max_tokens=rng.choice([2, 200]),
                    ignore_eos=True) as s:
        next(iter(s), None)


def contexts():
    ctx = k.context(system="You are tiny.")
    ctx.generate("12+47=", max_tokens=rng.randint(1, 4))
    child = ctx.fork()
    for _ in child.generate("reverse c a t =", stream=True, max_tokens=4):
        pass
    child.close()
    ctx.generate("1+1=", max_tokens=2)        # the parent goes on after its fork
    kept.append(ctx)
    if len(kept) > 2:
        kept.pop(0).close()


def tokenize():
    k.tokenize("a b c " * rng.randint(700, 900))     # long: a tokenizer worker's


def long_prompt():
    ids = [rng.randrange(3, 400) for _ in range(rng.randint(100, 250))]   # 7-16 KV blocks
    k.generate(token_ids=ids, max_tokens=2)


def child():
    k.wait(k.spawn(["/bin/sleep", "0.2"]), timeout=CALL_TIMEOUT)


def vanish():
    if rng.random() < 0.1:
        os._exit(VANISH)                # the other thread is likely in a call


def loop(tid: int, ops: list) -> None:
    n = 0
    while not os.path.exists(STOP_FILE):
        call(tid, n, rng.choice(ops))
        n += 1


helper = threading.Thread(target=loop, args=(1, [stream, cancel]))
helper.start()
loop(0, [stream, cancel, contexts, tokenize, long_prompt, child, vanish])
helper.join()
say("done")
