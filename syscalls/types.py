"""The result types of every syscall: one definition, used by the kernel to answer and by
the SDK to read the answer.

Each is a frozen dataclass. `to_wire(x)` turns one (or a list or dict of them) into the
plain maps msgpack carries; `T.from_wire(map)` reads one back, ignoring keys it does not
know (a newer kernel may add some) and filling defaults for keys it lacks.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ProcState(str, enum.Enum):
    """A process's state as ps shows it (DESIGN.md "Processes")."""
    RUNNING = "running"        # has tokens in the engine's current batch
    READY = "ready"            # has LLM work accepted and not finished, none in the batch
    SLEEPING = "sleeping"      # no LLM work: running its own code or blocked in wait
    STOPPED = "stopped"        # SIGSTOP: its LLM work is not scheduled
    ZOMBIE = "zombie"          # exited; its status is not collected yet


class Record:
    """Base of the result types: from_wire and the nested types of fields."""
    _nested: ClassVar[dict] = {}      # field name -> Record type (or (list, type)/(dict, type))

    @classmethod
    def from_wire(cls, data: dict):
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, nested = data[f.name], cls._nested.get(f.name)
            if isinstance(nested, tuple):
                kind, t = nested
                value = ([t.from_wire(v) for v in value] if kind is list
                         else {_int_key(k): t.from_wire(v) for k, v in value.items()})
            elif nested is dict:
                value = {_int_key(k): v for k, v in value.items()}
            elif nested is not None:
                value = nested(value) if isinstance(nested, type) and issubclass(nested, enum.Enum) \
                    else nested.from_wire(value)
            kw[f.name] = value
        return cls(**kw)


def _int_key(k):
    """msgpack maps keep int keys, but a JSON round trip may have made them strings."""
    return int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k


def to_wire(x: Any) -> Any:
    """Plain data for msgpack: records become maps, enums their values, int keys strings,
    recursively."""
    if isinstance(x, Record):
        return {f.name: to_wire(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, enum.Enum):
        return x.value
    if isinstance(x, (list, tuple)):
        return [to_wire(v) for v in x]
    if isinstance(x, dict):      # msgpack map keys are strings on our wire (strict_map_key)
        return {str(k) if isinstance(k, int) else k: to_wire(v) for k, v in x.items()}
    return x


# ---- LLM calls ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Usage(Record):
    prompt_tokens: int = 0        # tokens before the first generated one (a context's included)
    cached_tokens: int = 0        # of those, already in the KV cache when the call started
    completion_tokens: int = 0    # tokens generated

    @property
    def computed_tokens(self) -> int:
        """Prompt tokens the kernel actually had to compute (prompt minus cached)."""
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class Completion(Record):
    """The reply of generate."""
    text: str = ""
    token_ids: list = field(default_factory=list)
    finish_reason: str = "stop"   # "stop" | "length" | "abort"
    usage: Usage = field(default_factory=Usage)
    _nested: ClassVar[dict] = {"usage": Usage}


@dataclass(frozen=True)
class Delta(Record):
    """One streaming event of generate(stream=True): new text and token ids."""
    text: str = ""
    token_ids: list = field(default_factory=list)


@dataclass(frozen=True)
class ContextInfo(Record):
    id: int = 0
    tokens: int = 0               # tokens in the context
    computed: int = 0             # of those, with KV in the cache
    blocks: int = 0               # KV blocks its sequence holds
    busy: bool = False            # a generate is running on it


# ---- processes ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Hello(Record):
    pid: int = 0
    ppid: int = 0
    kernel_pid: int = 0           # the kernel's OS pid
    version: int = 1              # the wire version
    owner: bool = False           # this connection holds the owner's rights


@dataclass(frozen=True)
class WaitStatus(Record):
    """The reply of wait: `exited` False when the timeout passed first."""
    pid: int = 0
    exited: bool = False
    status: int | None = None     # exit code; -N: killed by signal N; None: unknown (attached)


@dataclass(frozen=True)
class ProcInfo(Record):
    """One row of ps."""
    pid: int = 0
    ppid: int = 0
    name: str = ""
    state: ProcState = ProcState.SLEEPING
    nice: int = 0
    kv_blocks: int = 0            # KV blocks its requests and contexts hold
    calls: int = 0                # LLM calls in flight (accepted, not answered)
    contexts: int = 0
    tokens_in: int = 0            # prompt tokens computed for it (cached ones not counted)
    tokens_out: int = 0           # tokens generated for it
    cpu_percent: float = 0.0      # of its OS process, sampled about every second
    rss: int | None = None        # bytes; None when unknown or exited
    age: float = 0.0              # seconds since it started
    os_pid: int | None = None     # None for an attached program
    exit_status: int | None = None
    # Scheduling accounting (kernel/account.py), what the policies rank by:
    service: int = 0              # tokens the engine computed for it (prompt + generated)
    queued_s: float = 0.0         # seconds it had LLM work waiting and none running
    running_s: float = 0.0        # seconds it had tokens in the engine's batches
    preemptions: int = 0          # times one of its requests was preempted
    swaps: int = 0                # KV blocks of it moved out to host swap or disk
    kv_swapped: int = 0           # KV blocks of it in host swap now
    kv_disk: int = 0              # KV blocks of it on disk now
    tok_in_s: float = 0.0         # prompt tokens per second computed for it, last second
    tok_out_s: float = 0.0        # tokens per second generated for it, last second
    _nested: ClassVar[dict] = {"state": ProcState}


@dataclass(frozen=True)
class Limits(Record):
    """Per-process limits, as rlimits: inherited by children, lowered by the process or an
    ancestor, raised only by the owner. None: no limit. Over one, a call fails with EAGAIN
    (calls, children) or ENOMEM (kv_blocks, contexts) naming it; tokens_per_s throttles.
    KILL, CANCEL and EXIT are never refused by a limit. On the wire (setrlimit, spawn's
    `limits`) a limit is lifted with the word "unlimited" (syscalls/args.py UNLIMITED): there
    an absent or null one is left as it is."""
    calls: int | None = None          # LLM calls in flight (generate)
    kv_blocks: int | None = None      # device KV blocks its requests and contexts hold
    contexts: int | None = None       # contexts open at once
    children: int | None = None       # live child processes
    tokens_per_s: float | None = None  # generated tokens per second (a token bucket)

    NAMES: ClassVar[tuple] = ("calls", "kv_blocks", "contexts", "children", "tokens_per_s")

    def raises(self, other: "Limits") -> list[str]:
        """The names of the limits that `other` sets higher than self (or lifts)."""
        return [n for n in self.NAMES if getattr(self, n) is not None
                and (getattr(other, n) is None or getattr(other, n) > getattr(self, n))]


# ---- the system ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KVInfo(Record):
    """The KV pool in blocks of `block_size` tokens."""
    total: int = 0
    used: int = 0                 # referenced by a request or context
    cached: int = 0               # holding a cached prefix, referenced or not (unreferenced
                                  # ones are counted in free too: takeable)
    free: int = 0                 # takeable now (cached included)
    block_size: int = 0
    swap_total: int = 0           # host swap pool
    swap_free: int = 0


@dataclass(frozen=True)
class ProcMem(Record):
    """One process's KV, in blocks: where its contexts' and requests' KV is now."""
    resident: int = 0             # in the device pool
    swapped: int = 0              # paged out to the host swap pool
    disk: int = 0                 # paged out to files under the home (--kv-disk)


@dataclass(frozen=True)
class ModelMem(Record):
    """One loaded model's memory: its weights and its own KV pools."""
    kv: KVInfo = field(default_factory=KVInfo)
    weight_bytes: int = 0
    kv_bytes: int = 0             # device KV pool
    swap_bytes: int = 0           # host swap pool
    _nested: ClassVar[dict] = {"kv": KVInfo}


@dataclass(frozen=True)
class MemInfo(Record):
    kv: KVInfo = field(default_factory=KVInfo)    # every loaded model's pools together
    procs: dict = field(default_factory=dict)     # pid -> ProcMem
    disk_total: int = 0           # KV blocks the disk tier may hold (0: no disk tier)
    disk_used: int = 0
    models: dict = field(default_factory=dict)    # model name -> ModelMem
    memory_budget: int = 0        # bytes the model table may hold (llmos up --memory)
    memory_used: int = 0          # held by the loaded models' weights and KV pools
    _nested: ClassVar[dict] = {"kv": KVInfo, "procs": (dict, ProcMem), "models": (dict, ModelMem)}


@dataclass(frozen=True)
class SchedInfo(Record):
    """The reply of sched: the policy in force and the ones there are."""
    policy: str = ""
    policies: list = field(default_factory=list)


@dataclass(frozen=True)
class ModelInfo(Record):
    name: str = ""
    path: str = ""
    model_type: str = ""
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    vocab: int = 0
    max_len: int = 0              # context length the kernel serves
    dtype: str = ""
    dtype_reason: str = ""        # "asked", or why "auto" chose dtype
    weight_bytes: int = 0         # memory the weights hold, as the driver prepared them
    state: str = ""               # "ready", "loading", or "registered" (a name, not loaded)
    params: int = 0               # parameters
    quantize: str = ""            # "" or "int8" (weight-only, at load)
    kv_blocks: int = 0            # its KV pool, in blocks
    kv_bytes: int = 0             # its KV pool on the device
    swap_bytes: int = 0           # its host swap pool
    requests: int = 0             # queued or running
    contexts: int = 0             # live contexts (they pin the model)
    last_used: float = 0.0        # time.time() of its latest work (0: never loaded)
    keep_alive: float | None = None   # s idle before it is unloaded; None: never
    progress: float = 0.0         # share of the weights read (while loading)
    load_seconds: float = 0.0     # how long its load took
    default: bool = False         # the model a call that names none gets
    tool_format: str = ""         # how its chat template writes tool calls: "hermes"
                                  # (<tool_call>{json}</tool_call>), or "" (none known, or
                                  # a registered model whose directory was not opened yet)


@dataclass(frozen=True)
class SysInfo(Record):
    version: int = 1              # wire version
    release: str = ""             # the llmos package version
    driver: str = ""              # the driver in use (never "auto")
    device: str = ""
    model: str = ""
    dtype: str = ""               # the model's weights and KV
    dtype_reason: str = ""        # "asked", or why "auto" chose it
    procs: int = 0
    uptime: float = 0.0
    steps: int = 0                # engine steps run
    computed_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    agent_user: str | None = None  # the user agents run as (`--agent-user`); None: the kernel's
    isolation: str = "none"        # "uid": agents run under a uid not the kernel's; "none": same
    max_agents: int = 0            # agent processes running at once, at most (then EAGAIN)
    models: list = field(default_factory=list)   # the names of the loaded models
    policy: str = ""               # the scheduling policy in force (sched, llmos up --sched)


@dataclass(frozen=True)
class SyscallInfo(Record):
    """One entry of the syscall table (the reply of syscalls)."""
    nr: int = 0
    name: str = ""
    implemented: bool = False
    args: dict = field(default_factory=dict)      # argument name -> its spec as data
    one_of: list = field(default_factory=list)
    at_most_one: list = field(default_factory=list)


# ---- metrics (the reply of metrics: what `llmos serve`'s /metrics and `top` read) ----------

@dataclass(frozen=True)
class Histogram(Record):
    """Observations (seconds) in buckets: counts[i] are those <= bounds[i] and above the
    bound before (not cumulative); the last count is those above every bound (+Inf)."""
    bounds: list = field(default_factory=list)
    counts: list = field(default_factory=list)    # len(bounds) + 1
    sum: float = 0.0
    count: int = 0


@dataclass(frozen=True)
class ModelMetrics(Record):
    """One loaded model's counters since it loaded, and its state now."""
    model: str = ""
    requests: dict = field(default_factory=dict)  # finish reason (stop, length, abort, error) -> count
    prompt_tokens: int = 0        # prompt tokens of finished requests (computed or cached)
    computed_tokens: int = 0      # prompt tokens computed (not taken from the prefix cache)
    generated_tokens: int = 0
    running: int = 0              # requests in the engine's batch now
    waiting: int = 0              # requests accepted, not in the batch (queued, preempted, stopped)
    preemptions: int = 0
    kv: KVInfo = field(default_factory=KVInfo)
    swapped_blocks: int = 0       # KV blocks of this model's contexts/requests in host swap or on disk
    ttft: Histogram = field(default_factory=Histogram)   # time to first token, from acceptance
    tpot: Histogram = field(default_factory=Histogram)   # time per output token after the first
    e2e: Histogram = field(default_factory=Histogram)    # acceptance to finish
    _nested: ClassVar[dict] = {"kv": KVInfo, "ttft": Histogram, "tpot": Histogram,
                               "e2e": Histogram}


@dataclass(frozen=True)
class ProcMetrics(Record):
    """One process's LLM counters (ProcMetrics of pid 0, name "other": all not listed)."""
    pid: int = 0
    name: str = ""
    requests: int = 0             # generate calls finished
    tokens_in: int = 0
    tokens_out: int = 0


@dataclass(frozen=True)
class Metrics(Record):
    """The reply of metrics. Bounded: at most METRICS_PROCS processes (the most tokens in
    and out), the rest summed in `others`; models are the loaded ones."""
    uptime: float = 0.0
    models: list = field(default_factory=list)            # ModelMetrics
    procs: list = field(default_factory=list)             # ProcMetrics
    others: ProcMetrics = field(default_factory=ProcMetrics)
    _nested: ClassVar[dict] = {"models": (list, ModelMetrics), "procs": (list, ProcMetrics),
                               "others": ProcMetrics}
