"""The agent SDK: a typed, blocking Python face on the syscalls.

    from llmos.userland import connect
    k = connect()                                  # spawned: its own secret; else the home
    print(k.generate("12+47=", max_tokens=8).text)
    with k.context(system="You are tiny.") as ctx:  # a conversation kept in the kernel's KV
        ctx.generate(messages=[{"role": "user", "content": "add 12 47"}])

Imports only the client half of syscalls (zmq, msgpack, stdlib): an agent starts fast.
Every error is a SyscallError with `.code` (EINVAL, ENOMEM, ESRCH, ...); a kernel that
stops answering is KernelDead (itself a SyscallError, code EDEAD). One Kernel may be
shared by many threads. The handles a Kernel gives for LLM work (Stream, Context) are in
userland/llm.py.
"""
from __future__ import annotations

import math
import weakref
from pathlib import Path

from llmos.syscalls import CallTimeout, Connection, KernelDead, Sys, SyscallError  # noqa: F401 (re-exported)
from llmos.syscalls.args import UNLIMITED
from llmos.syscalls.client import CallHandle
from llmos.syscalls.types import (Completion, ContextInfo, Delta, Hello, Histogram,  # noqa: F401
                                  Limits, MemInfo, Metrics, ModelInfo, ModelMetrics, ProcInfo,
                                  ProcMem, ProcMetrics, ProcState, SchedInfo, SyscallInfo,
                                  SysInfo, Usage, WaitStatus)

from .llm import Context, Stream, _generate_args  # noqa: F401 (Context, Stream: re-exported)

WAIT_SLACK = 5.0     # seconds the client waits past a wait(timeout=) before giving up itself



class KernelNotRunning(KernelDead):
    """connect() found no kernel to talk to. The message says how to start one."""


def _given(**args) -> dict:
    """The arguments that are not None (absent on the wire: the kernel's default)."""
    return {k: v for k, v in args.items() if v is not None}


def _limits(limits: dict) -> dict:
    """Limits for the wire: a value of None (no limit) becomes UNLIMITED."""
    return {str(n): UNLIMITED if v is None else v for n, v in limits.items()}


class Kernel:
    """A connection to the kernel as one llmos process (`.pid`). Made by connect().

    Methods block until the kernel answers; they raise SyscallError (.code) or KernelDead.
    Thread-safe. Use as a context manager, or call close().
    """

    def __init__(self, conn: Connection, home: Path | None = None, attached: bool = False):
        self._conn = conn
        self.home = home                         # the kernel's home, if known (for logs)
        self.attached = attached                 # hello'd with a token or key, not a secret
        # An attached program is a process only while it runs: it exits as one when it
        # closes, is collected, or the interpreter ends, whichever comes first.
        self._leave = weakref.finalize(self, _leave, conn) if attached else None
        hello = Hello.from_wire(conn.hello or {})
        self.pid: int = hello.pid
        self.ppid: int = hello.ppid
        self.kernel_pid: int = hello.kernel_pid
        self.version: int = hello.version
        self.owner: bool = hello.owner          # this connection holds the owner's rights

    def __repr__(self):
        return f"<Kernel pid={self.pid} at {self._conn.endpoint}>"

    @property
    def alive(self) -> bool:
        """False once the kernel is taken for dead (closed, or silent): every call raises
        KernelDead; connect() again for a kernel started anew."""
        return self._conn.dead is None

    def _call(self, nr, _timeout=None, **args):
        return self._conn.call(nr, _timeout=_timeout, **args)

    # ---- LLM work ---------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, messages: list | None = None,
                 token_ids: list | None = None, stream: bool = False, **options):
        """A completion of exactly one of prompt / messages / token_ids.

        Options (omitted ones take the kernel's defaults): max_tokens, temperature, top_k,
        top_p, min_p, seed, stop (a str or list), stop_token_ids, ignore_eos, model (a
        registered name, a model directory or .gguf file, or "tiny"; absent: the kernel's
        default model; one not loaded is loaded first; ENOENT names the names), share (a prefix-cache share
        group: by default only this process's tree reuses its cached prefixes), tools
        (OpenAI's, a list of maps, with messages only: the chat template lists them;
        ModelInfo.tool_format says how the model writes its calls).
        Returns a Completion; with stream=True, a Stream of Delta whose `.completion` is
        set once it is exhausted.
        """
        return self._generate(_generate_args(prompt, messages, token_ids, options), stream)

    def _generate(self, args: dict, stream: bool):
        if stream:
            handle = CallHandle()
            return Stream(self._conn.stream(Sys.GENERATE, stream=True, _handle=handle, **args),
                          handle)
        return Completion.from_wire(self._call(Sys.GENERATE, **args))

    def context(self, system: str | None = None, messages: list | None = None,
                model: str | None = None, share: str | None = None,
                tools: list | None = None) -> "Context":
        """A new context (KV kept between calls), optionally started with a system prompt
        or messages (and the `tools` the chat template lists with them), its prefix cached
        for `share` (a group name) or this process tree. Free it with close() or a `with`
        block."""
        args = _given(system=system, messages=messages, model=model, share=share, tools=tools)
        return Context(self, self._call(Sys.CONTEXT_CREATE, **args)["context"])

    def tokenize(self, text: str, model: str | None = None) -> list[int]:
        """Token ids of text under the kernel's model. Raises E2BIG for a text far longer
        than the model's context."""
        return self._call(Sys.TOKENIZE, text=text, **_given(model=model))["token_ids"]

    def detokenize(self, token_ids, model: str | None = None) -> str:
        return self._call(Sys.DETOKENIZE, token_ids=list(token_ids), **_given(model=model))["text"]

    # ---- processes ----------------------------------------------------------------------
    def spawn(self, argv, name: str | None = None, nice: int | None = None,
              env: dict | None = None, limits: dict | None = None) -> int:
        """Start argv (a list; a str is one program without arguments) as a child process
        of this one; returns its pid. Its stdout and stderr go to log_path(pid). Its limits
        are this process's, with `limits` ({name: value, None: no limit}) set instead:
        lower ones, or higher for the owner only (EPERM). Raises EAGAIN at this process's
        children limit."""
        argv = [argv] if isinstance(argv, str) else [str(a) for a in argv]
        args = {"argv": argv}
        if name is not None:
            args["name"] = name
        if nice is not None:
            args["nice"] = nice
        if env is not None:
            args["env"] = {str(k): str(v) for k, v in env.items()}
        if limits is not None:
            args["limits"] = _limits(limits)
        return self._call(Sys.SPAWN, **args)["pid"]

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """Wait for pid to exit; returns its exit status (negative: killed by that signal;
        None: unknown, an attached program that vanished), or None if `timeout` seconds
        passed first (see wait_status to tell the two apart). A parent collects its child;
        the owner may wait for any process. Raises ESRCH, EPERM, EINVAL."""
        return self.wait_status(pid, timeout).status

    def wait_status(self, pid: int, timeout: float | None = None) -> WaitStatus:
        """wait() with the whole answer: WaitStatus(pid, exited, status)."""
        args = {"pid": pid} if timeout is None else {"pid": pid, "timeout": float(timeout)}
        client = math.inf if timeout is None else timeout + WAIT_SLACK
        return WaitStatus.from_wire(self._call(Sys.WAIT, _timeout=client, **args))

    def kill(self, pid: int, sig: str | int = "TERM") -> None:
        """Send sig (TERM, KILL, INT, STOP, CONT, by name or number) to pid."""
        self._call(Sys.KILL, pid=pid, sig=sig)

    def ps(self) -> list[ProcInfo]:
        """The process table: one ProcInfo per process, by pid."""
        return [ProcInfo.from_wire(r) for r in self._call(Sys.PS)["procs"]]

    def getpid(self) -> int:
        return self._call(Sys.GETPID)["pid"]

    def nice(self, value: int, pid: int | None = None) -> None:
        """Set the nice value (-20..19) of pid, or of this process."""
        self._call(Sys.NICE, value=value, **({} if pid is None else {"pid": pid}))

    def setrlimit(self, pid: int | None = None, **limits) -> Limits:
        """Set limits of pid (or of this process): calls, kv_blocks, contexts, children,
        tokens_per_s, each a number or None (no limit); those not named stay. A process
        may lower its own and its descendants'; raising one is the owner's (EPERM).
        Returns the limits now in force."""
        return Limits.from_wire(self._call(Sys.SETRLIMIT, **_limits(limits), **_given(pid=pid)))

    def getrlimit(self, pid: int | None = None) -> Limits:
        """The limits of pid (or of this process); None is no limit. Raises EPERM for a
        process that is not this one or a descendant (the owner may read any)."""
        return Limits.from_wire(self._call(Sys.GETRLIMIT, **_given(pid=pid)))

    def sched(self, policy: str | None = None) -> SchedInfo:
        """The scheduling policy in force and those there are; with `policy`, switch to it
        first (the owner only: EPERM; an unknown name: EINVAL naming them)."""
        return SchedInfo.from_wire(self._call(Sys.SCHED, **_given(policy=policy)))

    def exit(self, status: int = 0) -> None:
        """Leave the kernel, then close the connection; the program itself should exit next
        (e.g. sys.exit(status)). An attached program tells the kernel its status here; a
        spawned one's status is what its OS process exits with (the kernel sees it)."""
        if self._leave is None:                 # spawned: the OS reports our exit
            self.close()
            return
        self._leave.detach()
        try:
            self._call(Sys.EXIT, status=status)
        except KernelDead:
            pass        # the kernel may drop us as soon as it has the status
        finally:
            self.close()

    def log_path(self, pid: int) -> Path | None:
        """Where the stdout/stderr of spawned pid go, or None if this kernel's home is unknown."""
        return None if self.home is None else self.home / "log" / f"{pid}.log"

    # ---- the system ---------------------------------------------------------------------
    def meminfo(self) -> MemInfo:
        """KV pool and swap (MemInfo.kv), the disk tier, and where the KV of each process
        that holds some is (MemInfo.procs: pid -> ProcMem, in blocks)."""
        return MemInfo.from_wire(self._call(Sys.MEMINFO))

    def models(self) -> list[ModelInfo]:
        """Every model the kernel has loaded, is loading, or has registered (ModelInfo.state
        says which; `default` marks the model of calls that name none)."""
        return [ModelInfo.from_wire(m) for m in self._call(Sys.MODELS)["models"]]

    def model_load(self, name: str, keep_alive: float | None = None,
                   timeout: float | None = None) -> ModelInfo:
        """Load model `name` (a registered name, a model directory or .gguf file, "tiny")
        and return it once it is in; keep_alive: seconds it stays once idle (negative: for
        ever). Owner only (EPERM). ENOENT: no such model; EINVAL: it cannot load (the
        message names the file and why); ENOMEM: it does not fit, naming what holds the
        memory."""
        return ModelInfo.from_wire(self._call(Sys.MODEL_LOAD, timeout,
                                              **_given(name=name, keep_alive=keep_alive)))

    def model_unload(self, name: str) -> None:
        """Unload model `name` now. Owner only. ENOENT: not loaded; EBUSY: a request or a
        context of it is live."""
        self._call(Sys.MODEL_UNLOAD, name=name)

    def model_add(self, name: str, path: str, dtype: str | None = None,
                  quantize: str | None = None, keep_alive: float | None = None) -> ModelInfo:
        """Register `name` for the model directory or .gguf file at path (in the home's
        models.toml), with the dtype and quantization it loads in. Owner only. EEXIST:
        the name is taken; EINVAL: the model there cannot be read."""
        return ModelInfo.from_wire(self._call(
            Sys.MODEL_ADD, name=name, path=str(path),
            **_given(dtype=dtype, quantize=quantize, keep_alive=keep_alive)))

    def model_rm(self, name: str) -> None:
        """Forget a registered name (a loaded model stays loaded). Owner only."""
        self._call(Sys.MODEL_RM, name=name)

    def sysinfo(self) -> SysInfo:
        return SysInfo.from_wire(self._call(Sys.SYSINFO))

    def metrics(self) -> Metrics:
        """Each loaded model's counters since it loaded (requests by how they ended,
        tokens, latency histograms) and its state now; the processes this one may see in
        ps, the busiest by name (at most the kernel's METRICS_PROCS), the rest in
        `others`. As the engine last published them: at most 50 ms old while it is busy."""
        return Metrics.from_wire(self._call(Sys.METRICS))

    def syscalls(self) -> list[SyscallInfo]:
        """The kernel's syscall table: number, name, and the spec of its arguments."""
        return [SyscallInfo.from_wire(e) for e in self._call(Sys.SYSCALLS)["syscalls"]]

    def ping(self) -> None:
        self._call(Sys.PING)

    def close(self) -> None:
        """Close the connection; calls still waiting in other threads raise KernelDead.
        An attached program (not spawned by the kernel) first exits as a process, so it
        does not linger in `ps`; its children live on, re-parented to the kernel."""
        if self._leave is not None:
            self._leave()                 # runs at most once
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _leave(conn: Connection) -> None:
    """Exit as a process (status 0), best effort: the kernel may be gone already."""
    try:
        conn.call(Sys.EXIT, _timeout=2.0, status=0)
    except SyscallError:          # KernelDead and CallTimeout included
        pass
