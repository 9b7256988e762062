"""The line protocol between bench/peers.py and a peer runner, both ends. Standard library
only: the runner end runs in a peer's own virtual environment (bench/.peers/<name>/).

One JSON object a line, each carrying the protocol version "v". The parent sends:
    {"v": 1, "cmd": "load", "model": DIR, "work": DIR, "dtype": "float32"|"bfloat16",
     "threads": N, "max_seqs": N, "max_len": N}
    {"v": 1, "cmd": "run", "prompts": [[token id, ...], ...], "new_tokens": N}
    {"v": 1, "cmd": "quit"}
and the runner answers each with {"v": 1, "ok": true, ...} or {"v": 1, "ok": false,
"error": "one line"}: "load" with "info" (engine and version), "run" with "seconds" (the
generation call alone, as the parent times its in-process engines) and "outputs" (the new
token ids of each prompt, in order). A runner decodes exactly new_tokens per prompt,
greedily, ignoring EOS.

The runner keeps the protocol on its own copy of stdout and points fd 1 at stderr, so that
what a library prints (vLLM logs to stdout) can never corrupt a reply.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

VERSION = 1
LOAD_TIMEOUT = 1800    # s: conversion, compilation and load on a busy 2-core box
RUN_TIMEOUT = 1800     # s: one timed run of the largest workload by the slowest peer


class PeerError(RuntimeError):
    """The peer answered with an error, sent a bad line, died or timed out."""


# ---- runner end (inside the peer's venv) -----------------------------------------------

@dataclass
class LoadRequest:
    model: str          # a Hugging Face checkpoint directory
    work: str           # a directory of the runner's own for converted files
    dtype: str          # "float32" or "bfloat16"
    threads: int
    max_seqs: int       # the most prompts one run sends
    max_len: int        # the longest prompt + new tokens one run asks for


def serve(load: Callable[[LoadRequest], object]) -> None:
    """Answer the parent's lines until "quit" or end of input. load(request) returns an
    engine with .info (str) and .generate(prompts, new_tokens) -> list of id lists; it
    raises with a one-line reason when the peer cannot take the model or dtype."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    engine = None
    for line in sys.stdin:
        try:
            msg = json.loads(line)
            if msg.get("v") != VERSION:
                raise ValueError(f"protocol version {msg.get('v')!r}, this runner speaks {VERSION}")
            cmd = msg.get("cmd")
            if cmd == "quit":
                _reply(out)
                return
            if cmd == "load":
                fields = {k: msg[k] for k in LoadRequest.__dataclass_fields__}
                engine = load(LoadRequest(**fields))
                _reply(out, info=engine.info)
            elif cmd == "run":
                if engine is None:
                    raise ValueError("run before load")
                start = time.perf_counter()
                outputs = engine.generate(msg["prompts"], int(msg["new_tokens"]))
                _reply(out, seconds=time.perf_counter() - start, outputs=outputs)
            else:
                raise ValueError(f"unknown command {cmd!r}")
        except Exception as exc:     # noqa: BLE001 — every failure becomes an error reply
            traceback.print_exc()
            _reply(out, ok=False, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])


def _reply(out, ok: bool = True, **fields) -> None:
    out.write(json.dumps({"v": VERSION, "ok": ok, **fields}) + "\n")
    out.flush()


# ---- parent end (bench/peers.py) -------------------------------------------------------

class Peer:
    """One runner process: `python runner.py` in a peer's venv, its stderr in `log`."""

    def __init__(self, python: Path, runner: Path, log: Path, env: dict | None = None):
        self.log = log
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                [str(python), str(runner)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, text=True, bufsize=1, env={**os.environ, **(env or {})},
                start_new_session=True)

    def load(self, req: LoadRequest) -> str:
        """The peer's info line; PeerError with the peer's reason if it cannot load."""
        return self._call({"cmd": "load", **req.__dict__}, LOAD_TIMEOUT)["info"]

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        reply = self._call({"cmd": "run", "prompts": prompts, "new_tokens": new_tokens},
                           RUN_TIMEOUT)
        return reply["seconds"], reply["outputs"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._call({"cmd": "quit"}, 30)
                self.proc.wait(30)
            except (PeerError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(30)

    def _call(self, msg: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"v": VERSION, **msg}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise PeerError(f"runner exited ({self.proc.poll()}); see {self.log}") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not ready:
            self.proc.kill()
            raise PeerError(f"no answer in {timeout:.0f} s; see {self.log}")
        if not line:
            raise PeerError(f"runner exited ({self.proc.wait()}); see {self.log}")
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            raise PeerError(f"bad line from runner: {line[:200]!r}") from None
        if reply.get("v") != VERSION:
            raise PeerError(f"runner speaks protocol {reply.get('v')!r}, not {VERSION}")
        if not reply.get("ok"):
            raise PeerError(reply.get("error", "error without a reason"))
        return reply
