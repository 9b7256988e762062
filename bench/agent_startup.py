"""How fast an agent starts and how much memory it takes: the hello agent, N times.

    python bench/agent_startup.py [-n 10]

Starts a kernel on `tiny` (as the tests do, tests/kernels.py), then runs the hello agent's code (connect(), one generate of "12+47=") N times as a fresh
subprocess. Startup is the wall time from just before exec until connect() returned (hello
answered), measured by the agent against the parent's timestamp; RSS is the agent's
resident memory (psutil) at that moment.
A bare python (importing psutil) is measured the same way for comparison.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kernels import short_home, start_kernel, stop_kernel  # noqa: E402

PROBE = """
import os, sys, time, psutil
t0 = float(sys.argv[1])
from llmos.userland import connect
k = connect()
t = time.time() - t0
rss = psutil.Process().memory_info().rss
mods = sum(m == 'torch' for m in sys.modules)
k.generate('12+47=', max_tokens=8)
print(t, rss, mods)
"""
BARE = "import sys, time, psutil; t = time.time() - float(sys.argv[1]); " \
       "print(t, psutil.Process().memory_info().rss, 0)"


def _run(code: str, env: dict, secret: str | None = None) -> tuple[float, int, int]:
    """Run code; a secret is handed over in a pipe, as the kernel hands a spawned agent its own."""
    from llmos.syscalls.secret import TOKEN_FD_ENV, hand_over
    fds = (hand_over(secret),) if secret else ()
    try:
        out = subprocess.run([sys.executable, "-c", code, repr(time.time())], cwd=ROOT,
                             env={**env, **{TOKEN_FD_ENV: str(fd) for fd in fds}},
                             pass_fds=fds, capture_output=True, text=True, timeout=60)
    finally:
        for fd in fds:
            os.close(fd)
    if out.returncode:
        raise RuntimeError(out.stderr)
    t, rss, torch = out.stdout.split()
    return float(t), int(rss), int(torch)


def measure_hello_agent(n: int = 10) -> dict:
    """Start the hello agent's connect path n times against a real kernel.

    Returns {"startup_s": [...], "rss_bytes": [...], "bare_startup_s", "bare_rss_bytes",
    "torch_loaded": bool}. Startup: exec until hello answered; RSS at that moment."""
    home = short_home()
    kernel = start_kernel(home)
    try:
        from llmos.syscalls.home import Home, read_token
        env = {**os.environ, "LLMOS_SOCKET": Home(home).socket_url}
        # The owner token handed over as a spawned agent's secret is: the same connect path.
        runs = [_run(PROBE, env, read_token(home)) for _ in range(n)]
        bare = [_run(BARE, env) for _ in range(max(3, n // 3))]
    finally:
        stop_kernel(kernel)
        shutil.rmtree(home, ignore_errors=True)
    return {"startup_s": [r[0] for r in runs], "rss_bytes": [r[1] for r in runs],
            "bare_startup_s": statistics.median(r[0] for r in bare),
            "bare_rss_bytes": statistics.median(r[1] for r in bare),
            "torch_loaded": any(r[2] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=10)
    n = ap.parse_args().n
    m = measure_hello_agent(n)
    s, r = m["startup_s"], m["rss_bytes"]
    mib = 1 << 20
    print(f"hello agent, {n} starts (python {sys.version.split()[0]}, {psutil.cpu_count()} cpus)")
    print(f"  startup until connected: median {statistics.median(s) * 1e3:.0f} ms, "
          f"min {min(s) * 1e3:.0f} ms, max {max(s) * 1e3:.0f} ms")
    print(f"  RSS when connected:      median {statistics.median(r) / mib:.1f} MiB, "
          f"max {max(r) / mib:.1f} MiB; torch loaded: {m['torch_loaded']}")
    print(f"  bare python (+psutil):   {m['bare_startup_s'] * 1e3:.0f} ms, "
          f"{m['bare_rss_bytes'] / mib:.1f} MiB")
    print(f"  => 30 agents: about {30 * statistics.median(r) / mib:.0f} MiB resident")


if __name__ == "__main__":
    main()
