"""The argument spec of every syscall: what each number accepts, checked before a handler runs.

Limits live here, each with why; they bound what one message can make the kernel do.
"""
from __future__ import annotations

from .args import UNLIMITED, Bool, Dict, Fields, Float, Int, Limit, List, Signal, Spec, Str
from .chat import Messages, Tools
from .errors import EINVAL, SyscallError
from .numbers import Sys

MAX_TEXT = 4 << 20           # characters in a prompt or text to tokenize: ~1M tokens
MAX_TOKENS_IN = 1 << 20      # token ids in one prompt: above any supported context length
MAX_ARGV = 256               # entries of a spawned argv, as a modest shell would allow
MAX_STOPS = 16               # stop strings / stop token ids of one generate call
INT64 = (-(1 << 63), (1 << 63) - 1)
MODEL_NAME = 4096            # characters of model=: a registered name or a path (PATH_MAX)
DTYPES = ("auto", "float32", "bfloat16", "float16")   # what a model may be loaded in
QUANTIZE = ("int8",)         # weight-only quantization at load (drivers/quant.py's)
# OpenAI's `tools` for the chat template: as many as OpenAI takes (128), each a JSON schema
# nested as deep as real ones get, all together a bounded text to render and tokenize.
TOOLS = Tools(objects=128, max_depth=16, max_bytes=256 << 10)

_pid = dict(min=0, max=(1 << 31) - 1)
_handle = dict(min=0, max=INT64[1])   # context and call handles are kernel-issued ints
_nice = dict(min=-20, max=19)
_token_ids = List(Int(min=0, max=(1 << 31) - 1), max_len=MAX_TOKENS_IN)
# A prefix-cache share group: processes of one user that name it share cached prefixes
# (by default only a process tree does). A short name, not a secret.
_share = Str(64, min_len=1)
# Per-process limits (types.Limits, same names): a number, or "unlimited" to lift one.
# tokens_per_s is a rate above 0: at 0 a request would wait forever for its first token.
_count = Limit(Int(min=0, max=(1 << 31) - 1))
LIMITS = {"calls": _count, "kv_blocks": _count, "contexts": _count, "children": _count,
          "tokens_per_s": Limit(Float(min=0, max=1e9, min_open=True))}

SPECS: dict[Sys, Spec] = {
    Sys.PING: Spec(),
    Sys.HELLO: Spec(token=Str(256, required=True), name=Str(64, min_len=1)),
    Sys.SYSCALLS: Spec(),
    Sys.SYSINFO: Spec(),
    Sys.SPAWN: Spec(argv=List(Str(4096), max_len=MAX_ARGV, min_len=1, required=True),
                    name=Str(64), nice=Int(**_nice),
                    env=Dict(Str(32 << 10), max_len=256), limits=Fields(LIMITS)),
    Sys.EXIT: Spec(status=Int(min=-(1 << 31), max=(1 << 31) - 1, required=True)),
    Sys.WAIT: Spec(pid=Int(**_pid, required=True), timeout=Float(min=0, max=1e9)),
    Sys.KILL: Spec(pid=Int(**_pid, required=True), sig=Signal(default="TERM")),
    Sys.PS: Spec(),
    Sys.GETPID: Spec(),
    Sys.NICE: Spec(pid=Int(**_pid), value=Int(**_nice, required=True)),
    Sys.GENERATE: Spec(
        one_of=[("prompt", "messages", "token_ids")],
        prompt=Str(MAX_TEXT), messages=Messages(content_len=MAX_TEXT),
        token_ids=_token_ids,
        max_tokens=Int(min=0, max=1 << 20), temperature=Float(min=0, max=100),
        top_k=Int(min=0, max=1 << 20), top_p=Float(min=0, max=1, min_open=True),
        min_p=Float(min=0, max=1), seed=Int(*INT64),
        stop=List(Str(256, min_len=1), max_len=MAX_STOPS),
        stop_token_ids=List(Int(min=0, max=(1 << 31) - 1), max_len=MAX_STOPS),
        ignore_eos=Bool(), context=Int(**_handle), stream=Bool(default=False),
        model=Str(MODEL_NAME), share=_share, tools=TOOLS),
    Sys.CANCEL: Spec(call=Int(**_handle, required=True)),
    Sys.CONTEXT_CREATE: Spec(at_most_one=[("system", "messages")], system=Str(MAX_TEXT),
                             messages=Messages(content_len=MAX_TEXT), model=Str(MODEL_NAME),
                             share=_share, tools=TOOLS),
    Sys.CONTEXT_FORK: Spec(context=Int(**_handle, required=True)),
    Sys.CONTEXT_FREE: Spec(context=Int(**_handle, required=True)),
    Sys.CONTEXT_INFO: Spec(context=Int(**_handle, required=True)),
    Sys.TOKENIZE: Spec(text=Str(MAX_TEXT, required=True), model=Str(MODEL_NAME)),
    Sys.DETOKENIZE: Spec(token_ids=List(_token_ids.of, max_len=MAX_TOKENS_IN, required=True),
                         model=Str(MODEL_NAME)),
    Sys.MEMINFO: Spec(),
    Sys.MODELS: Spec(),
    Sys.SCHED: Spec(policy=Str(32, min_len=1)),
    Sys.SETRLIMIT: Spec(pid=Int(**_pid), **LIMITS),
    Sys.GETRLIMIT: Spec(pid=Int(**_pid)),
    Sys.MODEL_LOAD: Spec(name=Str(MODEL_NAME, min_len=1, required=True),
                         keep_alive=Float(min=-1, max=1e9)),
    Sys.MODEL_UNLOAD: Spec(name=Str(MODEL_NAME, min_len=1, required=True)),
    Sys.MODEL_ADD: Spec(name=Str(64, min_len=1, required=True),
                        path=Str(MODEL_NAME, min_len=1, required=True),
                        dtype=Str(16, choices=DTYPES), quantize=Str(16, choices=QUANTIZE),
                        keep_alive=Float(min=-1, max=1e9)),
    Sys.MODEL_RM: Spec(name=Str(64, min_len=1, required=True)),
    Sys.METRICS: Spec(),
}


def parse_limit(text: str) -> tuple[str, int | float | str]:
    """'NAME=VALUE' (`llmos up --limit`, `llmos run --limit`, `llmos limit`) as the wire's
    (name, value): an int (tokens_per_s: a number) or UNLIMITED. Raises SyscallError
    (EINVAL) saying what is wrong."""
    name, sep, value = text.partition("=")
    if not sep or name not in LIMITS:
        raise SyscallError(EINVAL, f"{text!r}: expected NAME=VALUE with NAME one of "
                                   f"{', '.join(LIMITS)}")
    if value != UNLIMITED:
        try:
            value = int(value) if isinstance(LIMITS[name].of, Int) else float(value)
        except ValueError:
            raise SyscallError(EINVAL, f"{name}: {value!r} is neither a number nor "
                                       f"{UNLIMITED!r}") from None
    return name, LIMITS[name].check(name, value)
