"""A stand-in kernel for userland tests: the real syscall Server on a real home, stub handlers.

    python -m tests.userland.stub_kernel HOME      # prints "ready <pid>", serves until SIGTERM

It claims HOME like the kernel (pid lock, owner token, run/kernel.sock), spawns real OS
processes (their own session, LLMOS_SOCKET/LLMOS_TOKEN/LLMOS_PID set, output to
HOME/log/<pid>.log) and answers every syscall with the result shapes of the kernel
contract. Its "model" answers the embedded model's tasks ("12+47=" -> "59",
"reverse c a t =" -> " t a c", chat "add 12 47" -> "59") and "ok" otherwise, one token a
character. Special prompts: "hang" streams "." until cancelled, "nomem" fails ENOMEM.
No torch, no kernel.
"""
from __future__ import annotations

import itertools
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

from llmos.kernel.home import Home
from llmos.syscalls import (EACCES, ECHILD, ENOMEM, ESRCH, PENDING, Server, Sys,
                            SyscallError, SyscallTable)

STREAM_DELAY = 0.01     # seconds between streamed characters


def answer(prompt) -> str:
    """What the stub model says to a prompt (str) or messages (list)."""
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    if m := re.fullmatch(r"(?:add )?(\d+)[+ ](\d+)=?", text.strip()):
        return str(int(m[1]) + int(m[2]))
    if m := re.fullmatch(r"reverse ((?:\w )*\w)(?: =)?", text.strip()):
        letters = " ".join(reversed(m[1].split()))
        return letters if isinstance(prompt, list) else " " + letters
    return "ok"


class StubKernel:
    def __init__(self, home: str):
        self.home = Home(home)
        self.token = self.home.acquire()
        self.lock = threading.Lock()
        self.pids = itertools.count(1)
        self.procs: dict[int, dict] = {}        # pid -> {ppid, name, popen, token, status, t0}
        self.tokens: dict[str, int] = {}        # per-process token -> pid
        self.contexts: dict[int, int] = {}      # context -> tokens held
        self.ctx_ids = itertools.count(100)
        self.cancelled: set = set()             # (peer, call id) of cancelled generates
        self.started = time.time()
        table = SyscallTable()
        for nr in Sys:
            fn = getattr(self, "sys_" + nr.name.lower(), None)
            if fn is not None:    # validated args carry None for options not given: drop them
                table.register(nr, lambda call, a, fn=fn: fn(call, {k: v for k, v in a.items()
                                                                    if v is not None}))
        self.server = Server(self.home.socket_url, table).start()

    def close(self):
        self.server.close()
        for p in list(self.procs.values()):
            if p.get("popen") and p["popen"].poll() is None:
                os.killpg(p["popen"].pid, signal.SIGKILL)
                p["popen"].wait(5)
        self.home.release()

    def _proc(self, pid):
        if pid not in self.procs:
            raise SyscallError(ESRCH, f"no process {pid}")
        return self.procs[pid]

    # ---- processes ----------------------------------------------------------------------
    def sys_hello(self, call, a):
        with self.lock:
            pid = self.tokens.get(a["token"])
            if pid is None:
                if a["token"] != self.token:
                    raise SyscallError(EACCES, "bad token")
                pid = next(self.pids)
                self.procs[pid] = {"ppid": 0, "name": "attached", "t0": time.time()}
        call.conn.pid = pid
        return {"pid": pid, "ppid": self.procs[pid]["ppid"], "kernel_pid": os.getpid(), "version": 1}

    def sys_spawn(self, call, a):
        with self.lock:
            pid, token = next(self.pids), secrets.token_hex(16)
            self.tokens[token] = pid
        env = {**os.environ, **a.get("env", {}), "LLMOS_SOCKET": self.home.socket_url,
               "LLMOS_TOKEN": token, "LLMOS_PID": str(pid)}
        log = open(self.home.proc_log(pid), "wb")
        try:
            popen = subprocess.Popen(a["argv"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise SyscallError("ENOENT", str(e)) from None
        finally:
            log.close()
        self.procs[pid] = {"ppid": call.conn.pid, "name": a.get("name") or os.path.basename(a["argv"][0]),
                           "popen": popen, "nice": a.get("nice", 0), "t0": time.time()}
        return {"pid": pid}

    def sys_wait(self, call, a):
        p = self._proc(a["pid"])
        if p["ppid"] != call.conn.pid or "popen" not in p:
            raise SyscallError(ECHILD, f"{a['pid']} is not a child of {call.conn.pid}")

        def waiter():
            try:
                status = p["popen"].wait(a.get("timeout"))
            except subprocess.TimeoutExpired:
                status = None
            if status is not None:
                self.procs.pop(a["pid"], None)
            call.reply({"pid": a["pid"], "status": p.get("exit", status)})
        threading.Thread(target=waiter, daemon=True).start()
        return PENDING

    def sys_kill(self, call, a):
        p = self._proc(a["pid"])
        if "popen" not in p:
            raise SyscallError("EPERM", "not a spawned process")
        os.killpg(p["popen"].pid, getattr(signal, "SIG" + a["sig"]))
        return {}

    def sys_ps(self, call, a):
        rows = [{"pid": pid, "ppid": p["ppid"], "name": p["name"],
                 "state": "ZOMBIE" if "popen" in p and p["popen"].poll() is not None else "SLEEPING",
                 "nice": p.get("nice", 0), "kv_blocks": 0, "tokens_in": 0, "tokens_out": 0,
                 "cpu_percent": 0.0, "rss": 0, "age": time.time() - p["t0"],
                 "os_pid": p["popen"].pid if "popen" in p else None}
                for pid, p in sorted(self.procs.items())]
        return {"procs": rows}

    def sys_getpid(self, call, a):
        return {"pid": call.conn.pid, "ppid": self.procs[call.conn.pid]["ppid"]}

    def sys_nice(self, call, a):
        self._proc(a.get("pid", call.conn.pid))["nice"] = a["value"]
        return {}

    def sys_exit(self, call, a):
        self._proc(call.conn.pid)["exit"] = a["status"]
        return {}

    # ---- LLM work -----------------------------------------------------------------------
    def sys_generate(self, call, a):
        prompt = a.get("prompt", a.get("messages"))
        if prompt == "nomem":
            raise SyscallError(ENOMEM, "out of KV blocks")
        n_prompt = len(prompt) if isinstance(prompt, str) else len(
            a.get("token_ids") or "".join(m["content"] for m in prompt or []))
        cached = 0
        if "context" in a:
            if a["context"] not in self.contexts:
                raise SyscallError(ESRCH, f"no context {a['context']}")
            cached = self.contexts[a["context"]]
        text = "" if prompt == "hang" else answer(prompt if prompt is not None else "")
        max_tokens = a.get("max_tokens", 64)
        reason = "length" if len(text) > max_tokens else "stop"
        text = text[:max_tokens]
        if "context" in a:
            self.contexts[a["context"]] = cached + n_prompt + len(text)
        result = {"token_ids": [ord(c) for c in text], "text": text, "finish_reason": reason,
                  "usage": {"prompt_tokens": cached + n_prompt, "cached_tokens": cached,
                            "completion_tokens": len(text)}}
        if not a["stream"] and prompt != "hang":
            return result
        threading.Thread(target=self._stream, args=(call, text, result, prompt == "hang"),
                         daemon=True).start()
        return PENDING

    def _stream(self, call, text, result, hang):
        key = (call.conn.peer, call.id)
        for c in itertools.repeat(".") if hang else text:
            if key in self.cancelled or call.done:
                break
            call.event({"text": c, "token_ids": [ord(c)]})
            time.sleep(STREAM_DELAY)
        if key in self.cancelled:
            result = {**result, "finish_reason": "abort"}
        call.reply(result)

    def sys_cancel(self, call, a):
        self.cancelled.add((call.conn.peer, a["call"]))
        return {}

    def sys_context_create(self, call, a):
        cid = next(self.ctx_ids)
        self.contexts[cid] = len(a.get("system", ""))
        return {"context": cid}

    def sys_context_fork(self, call, a):
        cid = next(self.ctx_ids)
        self.contexts[cid] = self._ctx(a)
        return {"context": cid}

    def sys_context_free(self, call, a):
        self._ctx(a)
        del self.contexts[a["context"]]
        return {}

    def sys_context_info(self, call, a):
        n = self._ctx(a)
        return {"id": a["context"], "tokens": n, "computed": n, "blocks": -(-n // 16), "busy": False}

    def _ctx(self, a):
        if a["context"] not in self.contexts:
            raise SyscallError(ESRCH, f"no context {a['context']}")
        return self.contexts[a["context"]]

    def sys_tokenize(self, call, a):
        return {"token_ids": [ord(c) for c in a["text"]]}

    def sys_detokenize(self, call, a):
        return {"text": "".join(map(chr, a["token_ids"]))}

    # ---- the system ---------------------------------------------------------------------
    def sys_meminfo(self, call, a):
        return {"kv": {"total": 1024, "free": 1000, "cached": 8, "used": 16, "block_size": 16,
                       "swap_total": 256, "swap_free": 256}, "procs": {"1": 16}}

    def sys_models(self, call, a):
        return {"models": [{"name": "tiny", "path": "<embedded>", "model_type": "llama",
                            "layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "vocab": 64,
                            "dtype": "float32", "max_len": 512}]}

    def sys_sysinfo(self, call, a):
        return {"version": "0.1.0", "driver": "stub", "device": "cpu", "model": "tiny",
                "uptime": time.time() - self.started, "procs": len(self.procs)}


def main(home: str) -> None:
    kernel = StubKernel(home)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", os.getpid(), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        kernel.close()


if __name__ == "__main__":
    main(sys.argv[1])
