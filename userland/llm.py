"""The SDK's handles on LLM work: a Stream (one streaming generate, which may be
cancelled from any thread), a Context (a conversation the kernel keeps in its KV), and
the wire arguments of a generate, which Kernel.generate and Context.generate share.
Kernel (userland/sdk.py) makes them; they call through it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from llmos.syscalls import KernelDead, Sys, SyscallError
from llmos.syscalls.client import CallHandle
from llmos.syscalls.types import Completion, ContextInfo, Delta

if TYPE_CHECKING:
    from .sdk import Kernel

_OPTIONS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
            "stop_token_ids", "ignore_eos", "model", "share", "tools")


class Stream:
    """Iterator of Delta of one streaming generate. When exhausted, `.completion` holds the
    final Completion (None until then). close() (or leaving a `with` block, or dropping the
    iterator) before the end cancels the generate in the kernel; so does cancel(), from
    any thread, after which the iterating thread gets SyscallError ECANCELED."""

    def __init__(self, gen, handle: CallHandle | None = None):
        self._gen, self._handle = gen, handle
        self.completion: Completion | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Delta:
        try:
            ev = next(self._gen)
        except StopIteration as stop:
            if self.completion is None and stop.value is not None:
                self.completion = Completion.from_wire(stop.value)
            raise
        return Delta.from_wire(ev)

    def result(self) -> Completion:
        """Consume the rest of the stream and return the Completion."""
        for _ in self:
            pass
        return self.completion

    def close(self) -> None:
        self._gen.close()

    def cancel(self) -> None:
        """Cancel the generate from any thread (a thread blocked in next() wakes up)."""
        if self._handle is not None:
            self._handle.cancel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _generate_args(prompt, messages, token_ids, options: dict) -> dict:
    """The wire arguments of a generate: the one source given, and only the options set."""
    args = {k: v for k, v in (("prompt", prompt), ("messages", messages),
                              ("token_ids", token_ids)) if v is not None}
    for k, v in options.items():
        if k not in _OPTIONS:
            raise TypeError(f"generate() got an unexpected keyword argument {k!r}")
        if v is not None:
            args[k] = [v] if k == "stop" and isinstance(v, str) else v
    for k in ("stop", "stop_token_ids", "token_ids"):
        if k in args:
            args[k] = list(args[k])
    return args


class Context:
    """A KV sequence this process keeps in the kernel (a conversation). Made by
    Kernel.context() or fork(). Each generate() continues it: its prompt and the reply stay
    in the context, so later calls compute only the new tokens."""

    def __init__(self, kernel: Kernel, cid: int):
        self.kernel, self.id = kernel, cid
        self.closed = False

    def __repr__(self):
        return f"<Context {self.id} of pid {self.kernel.pid}>"

    def generate(self, prompt: str | None = None, *, messages: list | None = None,
                 token_ids: list | None = None, stream: bool = False, **options):
        """Kernel.generate() on this context: same options, same results."""
        args = _generate_args(prompt, messages, token_ids, options)
        return self.kernel._generate({**args, "context": self.id}, stream)

    def append(self, content=None, *, messages: list | None = None,
               token_ids: list | None = None) -> Completion:
        """Add content (a str, or a list of messages) to the context without generating.
        Implemented as a generate with max_tokens=0; returns its Completion (empty text;
        usage tells the tokens computed)."""
        if isinstance(content, list):
            content, messages = None, content
        return self.generate(content, messages=messages, token_ids=token_ids, max_tokens=0)

    def fork(self) -> "Context":
        """A copy-on-write child context sharing this one's KV (free it separately)."""
        return Context(self.kernel, self.kernel._call(Sys.CONTEXT_FORK, context=self.id)["context"])

    def info(self) -> ContextInfo:
        return ContextInfo.from_wire(self.kernel._call(Sys.CONTEXT_INFO, context=self.id))

    def close(self) -> None:
        """Free the context in the kernel. Idempotent; a context already gone is fine."""
        if self.closed:
            return
        self.closed = True
        try:
            self.kernel._call(Sys.CONTEXT_FREE, context=self.id)
        except KernelDead:
            pass        # a dead kernel freed everything
        except SyscallError as e:
            if e.code != "ESRCH":
                raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            self.close()
        except SyscallError:
            if exc_type is None:
                raise   # never hide the exception that ended the block
