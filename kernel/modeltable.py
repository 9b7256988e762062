"""The model table: the models the kernel has loaded or is loading, in one memory budget.

Unit: bytes of device memory. Each model holds its weights and its own KV pool (the KV
layout differs per model); a slot reserves what its load plan says (load.Plan) when the
load is admitted, and what the loaded model really holds once it is in.

The rules:
  - a load is admitted if the budget has room; else the least recently used idle model
    is unloaded, and the next, until it has; if what is left is pinned, the load fails
    with ENOMEM naming what holds the memory. Idle: no request queued or running, no
    live context (a context pins its model), no command waiting for it;
  - weights are read on the loader thread (kernel/modelload.py), never the engine thread:
    the slot is LOADING until its Loaded command comes back through the inbox, and
    commands for it wait in the slot, in order, meanwhile (kernel/apply.py);
  - a model idle longer than its keep-alive is unloaded (`expire`);
  - `step` runs one step of the model with work that has had the least engine time, so
    models share the engine thread by time, and a long prefill of one model delays
    another model's decodes by one step at most.

Engine thread only, except `progress` of a slot (written by the loader thread, read by
anyone) and `budget` (read by anyone).
"""
from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from llmos.syscalls.errors import EBUSY, ENOENT, ENOMEM, SyscallError
from llmos.syscalls.types import ModelInfo

from . import inbox as cmd
from . import tunables
from .load import Plan, count_params, plan
from .modelload import Loader
from .registry import ModelSpec

log = logging.getLogger("llmos.models")
LOADING, READY = "loading", "ready"
FOREVER = math.inf


@dataclass(eq=False)
class Slot:
    """One model of the table."""
    spec: ModelSpec
    plan: Plan
    keep_alive: float                  # seconds idle before it is unloaded (inf: never)
    state: str = LOADING
    engine: object = None              # the Engine, once READY
    bytes: int = 0                     # device bytes it holds (the plan's until loaded)
    last_used: float = 0.0             # clock() of its latest work
    loaded_at: float = 0.0             # time.time() when it became READY
    load_seconds: float = 0.0
    progress: float = 0.0              # share of the weights read (the loader thread's)
    engine_time: float = 0.0           # seconds of engine steps it had (ModelTable.step)
    was_busy: bool = False             # it had work at the previous step
    waiting: list = field(default_factory=list)   # commands that came while LOADING

    @property
    def name(self) -> str:
        return self.spec.name

    def idle(self) -> bool:
        """Nothing pins it: no request, no context, nothing waiting, not loading."""
        e = self.engine
        return self.state == READY and not self.waiting and not e.requests and not e.contexts

    def holders(self) -> str:
        """What pins it, in words (for ENOMEM)."""
        if self.state == LOADING:
            return "loading"
        e = self.engine
        parts = [f"{len(e.requests)} request(s)" if e.requests else "",
                 f"{len(e.contexts)} context(s) of pid(s) "
                 f"{sorted({getattr(c.owner, 'pid', 0) for c in e.contexts.values()})}"
                 if e.contexts else "",
                 f"{len(self.waiting)} call(s) waiting" if self.waiting else ""]
        return ", ".join(p for p in parts if p)


class ModelTable:
    def __init__(self, driver, budget: int | None = None, *, keep_alive: float = tunables.KEEP_ALIVE,
                 plan_options: dict | None = None, engine_options: dict | None = None,
                 on_loaded: Callable[[cmd.Loaded], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """budget: bytes for weights and KV pools (default_budget when None). keep_alive:
        the default of a model loaded on demand. plan_options, engine_options: load.plan's
        and load.build's options for every model (a spec's dtype and quantize win).
        on_loaded: where the loader thread puts its Loaded command (the engine inbox)."""
        self.driver, self.clock = driver, clock
        self.budget = default_budget(driver) if budget is None else int(budget)
        self.keep_alive = _keep_alive(keep_alive, tunables.KEEP_ALIVE)
        self.plan_options = dict(plan_options or {})
        self.engine_options = dict(engine_options or {})
        self.on_loaded = on_loaded
        self.slots: dict[str, Slot] = {}
        self.retired = {"steps": 0, "computed_tokens": 0, "generated_tokens": 0,
                        "preemptions": 0, "paged_out": 0, "paged_in": 0}
        self.unloads = 0
        self._loader = Loader(driver, self.engine_options, lambda c: self.on_loaded(c))

    def close(self) -> None:
        self._loader.close()

    # ---- admitting and loading --------------------------------------------------------
    def plan(self, spec: ModelSpec, mdir) -> Plan:
        """The load plan of spec (its ModelDir opened). Raises ValueError for bad sizes."""
        options = dict(self.plan_options)
        options.update({k: v for k, v in (("dtype", spec.dtype), ("quantize", spec.quantize))
                        if v is not None})
        return plan(mdir, self.driver, **options)

    def admit(self, spec: ModelSpec, p: Plan, keep_alive: float | None = None) -> Slot:
        """A LOADING slot for spec, its bytes reserved (idle models unloaded for room);
        start reading its weights on the loader thread. Raises ENOMEM."""
        self._make_room(spec.name, p.device_bytes)
        ka = _keep_alive(keep_alive if keep_alive is not None else spec.keep_alive,
                         self.keep_alive)
        slot = Slot(spec, p, ka, bytes=p.device_bytes, last_used=self.clock())
        self.slots[spec.name] = slot
        log.info("loading model %s from %s (%s, %s of weights and KV)", spec.name, spec.path,
                 str(p.dtype).removeprefix("torch."), _size(p.device_bytes))
        self._loader.load(slot)
        return slot

    def load_now(self, spec: ModelSpec, mdir, keep_alive: float | None = None) -> Slot:
        """Load spec on this thread (at boot, before the engine loop runs). Raises
        ENOMEM, CheckpointError, ValueError."""
        p = self.plan(spec, mdir)
        self._make_room(spec.name, p.device_bytes, evict=False)   # boot models all stay
        slot = Slot(spec, p, _keep_alive(keep_alive if keep_alive is not None
                                         else spec.keep_alive, FOREVER))
        self.slots[spec.name] = slot
        try:
            self.installed(slot, self._loader.build(slot))
        except BaseException:
            del self.slots[spec.name]
            raise
        return slot

    def adopt(self, spec: ModelSpec, engine, keep_alive: float = FOREVER) -> Slot:
        """Put an engine made elsewhere in the table (tests, in-process kernels)."""
        slot = Slot(spec, None, keep_alive)
        self.slots[spec.name] = slot
        self.installed(slot, engine)
        return slot

    def installed(self, slot: Slot, engine) -> None:
        """Engine thread: slot's engine is in; it holds what it really takes now."""
        slot.engine, slot.state, slot.progress = engine, READY, 1.0
        slot.bytes = engine.model.weight_bytes + engine.kv_bytes
        slot.loaded_at, slot.last_used = time.time(), self.clock()
        if self.engine_options.get("policy") is not None:
            engine.set_policy(self.engine_options["policy"])
        log.info("model %s loaded in %.2f s: %s of weights, %d KV blocks (%s)", slot.name,
                 slot.load_seconds, _size(engine.model.weight_bytes), engine.num_blocks,
                 _size(engine.kv_bytes))

    def failed(self, slot: Slot) -> None:
        """Engine thread: slot's load failed; its reservation goes."""
        if self.slots.get(slot.name) is slot:
            del self.slots[slot.name]

    def _make_room(self, name: str, need: int, evict: bool = True) -> None:
        """Unload idle models (if evict), least recently used first, until need bytes fit.
        Raises ENOMEM naming what holds the memory if they cannot; then nothing is
        unloaded."""
        if need > self.budget:
            raise SyscallError(ENOMEM, f"model {name!r}: needs {_size(need)} (weights and KV "
                                       f"pool), more than the whole memory budget of "
                                       f"{_size(self.budget)} (llmos up --memory)")
        idle = sorted((s for s in self.slots.values() if evict and s.idle()),
                      key=lambda s: s.last_used)
        if self.used() - sum(s.bytes for s in idle) + need > self.budget:
            held = "; ".join(f"{s.name} {_size(s.bytes)} ({s.holders() or 'idle'})"
                             for s in self.slots.values())
            raise SyscallError(ENOMEM, f"model {name!r}: needs {_size(need)} but "
                                       f"{_size(self.used())} of the {_size(self.budget)} "
                                       f"budget is held by {held}")
        for slot in idle:
            if self.used() + need <= self.budget:
                break
            self._unload(slot, "to make room for " + name)

    # ---- unloading --------------------------------------------------------------------
    def unload(self, name: str) -> Slot:
        """Unload model name now. Raises ENOENT (not loaded), EBUSY (pinned)."""
        slot = self.slots.get(name)
        if slot is None:
            raise SyscallError(ENOENT, f"model: {name!r} is not loaded")
        if not slot.idle():
            raise SyscallError(EBUSY, f"model {name!r} is in use: {slot.holders()}")
        self._unload(slot, "asked")
        return slot

    def replace(self, slot: Slot) -> None:
        """slot's name now stands for another model (re-registered, or its file changed):
        unload the old one so the name can load anew. Raises EBUSY while it is in use."""
        if not slot.idle():
            raise SyscallError(EBUSY, f"model {slot.name!r}: the name now stands for another "
                                      f"model, but the one loaded under it ({slot.spec.path}) "
                                      f"is in use: {slot.holders()}; try again when it is idle")
        self._unload(slot, "its name now stands for another model")

    def expire(self) -> None:
        """Unload every idle model whose keep-alive ran out."""
        now = self.clock()
        for slot in [s for s in self.slots.values() if s.idle()]:
            if now - slot.last_used >= slot.keep_alive:
                self._unload(slot, f"idle for {slot.keep_alive:g} s (keep-alive)")

    def next_expiry(self) -> float | None:
        """Seconds until the next keep-alive runs out (None: none will)."""
        now = self.clock()
        left = [s.last_used + s.keep_alive - now for s in self.slots.values()
                if s.idle() and s.keep_alive != FOREVER]
        return max(0.0, min(left)) if left else None

    def _unload(self, slot: Slot, why: str) -> None:
        e = slot.engine
        self.retired = _add(self.retired, _counters(e))
        del self.slots[slot.name]
        slot.engine, self.unloads = None, self.unloads + 1
        del e
        gc.collect()               # the engine's cycles hold the pools: free them now
        log.info("model %s unloaded (%s): %s freed", slot.name, why, _size(slot.bytes))

    # ---- the engines ------------------------------------------------------------------
    def used(self) -> int:
        return sum(s.bytes for s in self.slots.values())

    def ready(self) -> list[Slot]:
        return [s for s in self.slots.values() if s.state == READY]

    def engines(self) -> list:
        return [s.engine for s in self.ready()]

    def has_work(self) -> bool:
        return any(e.has_work() for e in self.engines())

    def step(self) -> None:
        """One step of the model with work that has had the least engine time (as CFS's
        vruntime): models share the engine thread by time, not by steps, so a model with
        short steps is not held to a slow model's step rate; and a model that just ran a
        long step (a prefill) waits until the others caught up, so their decodes wait one
        step at most. A model that comes back from idle starts level with the busy ones."""
        busy = [s for s in self.ready() if s.engine.has_work()]
        if not busy:
            return
        level = min((s.engine_time for s in busy if s.was_busy), default=0.0)
        for s in busy:
            if not s.was_busy:
                s.engine_time, s.was_busy = max(s.engine_time, level), True
        for s in self.ready():
            s.was_busy = s in busy
        slot = min(busy, key=lambda s: s.engine_time)
        started = slot.last_used = self.clock()
        slot.engine.step()
        slot.engine_time += self.clock() - started

    def wake_in(self) -> float | None:
        """With no work now: seconds until throttled work may run or a keep-alive runs
        out (None: neither)."""
        times = [t for t in [e.wake_in() for e in self.engines()] + [self.next_expiry()]
                 if t is not None]
        return min(times) if times else None

    def touch(self, slot: Slot) -> None:
        slot.last_used = self.clock()

    def set_keep_alive(self, slot: Slot, seconds: float | None) -> None:
        """A new keep-alive for slot (None: keep its own)."""
        if seconds is not None:
            slot.keep_alive = _keep_alive(seconds, self.keep_alive)

    def info(self, slot: Slot) -> ModelInfo:
        """slot as `models` lists it (a READY one's figures; a LOADING one's plan)."""
        e, p, spec = slot.engine, slot.plan, slot.spec
        c = e.config if e is not None else p.mdir.config
        tokenizer = e.tokenizer if e is not None else p.mdir.tokenizer
        dtype = e.model.dtype if e is not None else p.dtype
        last = time.time() - (self.clock() - slot.last_used)
        return ModelInfo(
            name=spec.name, path=spec.path, model_type=c.model_type, layers=c.num_hidden_layers,
            hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
            vocab=c.vocab_size, max_len=e.max_model_len if e is not None else p.max_model_len,
            dtype=str(dtype).removeprefix("torch."),
            dtype_reason=e.dtype_reason if e is not None else p.dtype_reason,
            weight_bytes=e.model.weight_bytes if e is not None else p.weight_bytes,
            state=slot.state, params=count_params(c), quantize=(p.quantize if p is not None else None) or "", kv_blocks=e.num_blocks if e is not None else p.num_blocks,
            kv_bytes=e.kv_bytes if e is not None else p.kv_bytes,
            swap_bytes=e.swap_bytes if e is not None else p.swap_bytes,
            requests=len(e.requests) if e is not None else 0,
            contexts=len(e.contexts) if e is not None else 0,
            last_used=round(last, 3),
            keep_alive=None if slot.keep_alive == FOREVER else slot.keep_alive,
            progress=slot.progress, load_seconds=round(slot.load_seconds, 3),
            tool_format=tokenizer.tool_format)

    def with_request(self, rid: int) -> Slot | None:
        return next((s for s in self.ready() if rid in s.engine.requests), None)

    def with_context(self, cid: int) -> Slot | None:
        return next((s for s in self.ready() if cid in s.engine.contexts), None)

    def stats(self) -> dict:
        """Steps, tokens, preemptions and paging of every model since boot."""
        total = dict(self.retired)
        for e in self.engines():
            total = _add(total, _counters(e))
        return total


def _counters(e) -> dict:
    """An engine's steps, tokens, preemptions and paging."""
    return {**e.stats, "preemptions": e.scheduler.num_preemptions,
            "paged_out": e.pager.paged_out, "paged_in": e.pager.paged_in}


def _add(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


def default_budget(driver) -> int:
    """A share of the device's free memory; on a CPU, shared with everything, capped."""
    free, _ = driver.memory_info()
    budget = int(free * tunables.MEMORY_FRACTION)
    return min(budget, tunables.MEMORY_CAP_CPU) if driver.device.type == "cpu" else budget


def _keep_alive(asked: float | None, default: float) -> float:
    """Seconds; negative means forever (as Ollama's keep_alive)."""
    if asked is None:
        return default
    return FOREVER if asked < 0 else float(asked)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
