"""Null-syscall latency: llmos PING through Server + Connection vs a raw pyzmq msgpack echo.

Both run as two processes over ipc in the same run: this process is the client, a child
process is the server. Prints p50/p99 round trip in microseconds and the ratio.

    python bench/syscall_latency.py [--calls 5000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import msgpack
import zmq


def serve_raw(endpoint: str) -> None:
    """A ROUTER that decodes each msgpack request and answers it: the floor we compare with."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    print("ready", flush=True)
    while True:
        peer, frame = sock.recv_multipart()
        req = msgpack.unpackb(frame, raw=False)
        sock.send_multipart([peer, msgpack.packb({"v": 1, "id": req["id"], "ok": True, "r": {}})])


def serve_llmos(endpoint: str) -> None:
    from llmos.kernel.server import Server
    from llmos.kernel.syscall import SyscallTable
    Server(endpoint, SyscallTable()).start()
    print("ready", flush=True)
    threading.Event().wait()


def client_raw(endpoint: str, n: int) -> list[float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    out = []
    for i in range(n):
        t = time.perf_counter()
        sock.send(msgpack.packb({"v": 1, "id": i, "nr": 0, "a": {}}))
        msgpack.unpackb(sock.recv(), raw=False)
        out.append(time.perf_counter() - t)
    sock.close(linger=0)
    return out


def client_llmos(endpoint: str, n: int) -> list[float]:
    from llmos.syscalls import Connection, Sys
    out = []
    with Connection(endpoint) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.call(Sys.PING)
            out.append(time.perf_counter() - t)
    return out


def start_server(kind: str) -> tuple[subprocess.Popen, str]:
    d = tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp")
    endpoint = f"ipc://{d}/{kind}.sock"
    child = subprocess.Popen([sys.executable, __file__, "--serve", kind, endpoint],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child, endpoint


def measure(n: int, warmup: int, rounds: int) -> dict[str, list[float]]:
    """Both servers up at once; rounds alternate raw and llmos so machine noise hits both."""
    servers = {kind: start_server(kind) for kind in ("raw", "llmos")}
    clients = {"raw": client_raw, "llmos": client_llmos}
    try:
        out = {kind: [] for kind in servers}
        for _ in range(rounds):
            for kind, (_, endpoint) in servers.items():
                out[kind] += clients[kind](endpoint, warmup + n // rounds)[warmup:]
        return out
    finally:
        for child, _ in servers.values():
            child.kill()
            child.wait()
            child.stdout.close()


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "ENDPOINT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve_raw(a.serve[1]) if a.serve[0] == "raw" else serve_llmos(a.serve[1])
    results = measure(a.calls, a.warmup, a.rounds)
    print(f"null syscall round trip, ipc, two processes, {a.calls} calls, {os.cpu_count()} cpus")
    print(f"{'':8}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}")
    for kind, xs in results.items():
        print(f"{kind:8}{pct(xs, .5):10.1f}{pct(xs, .99):10.1f}{statistics.mean(xs) * 1e6:10.1f}")
    r50 = pct(results["llmos"], .5) / pct(results["raw"], .5)
    r99 = pct(results["llmos"], .99) / pct(results["raw"], .99)
    print(f"ratio llmos/raw: p50 {r50:.2f}x, p99 {r99:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
