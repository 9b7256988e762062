"""The engine: one model, one KV pool, continuous batching of requests and contexts.

Engine thread only: nothing here is locked, so one thread (the kernel's engine loop, or
a program using the engine in-process) makes every call. The step-level API is
`add_request`, `step`, `abort` and the `context_*` calls; `generate` is the batch
convenience built on them.

One step (`step`):
  1. the scheduler picks a batch under the token budget (preempting if KV runs out);
  2. requests that can never fit are refused;
  3. one forward pass for the whole batch (block copies and swaps were done as the
     scheduler decided them);
  4. newly full blocks enter the prefix cache;
  5. requests whose pending tokens all ran sample a token each (a first one is timed:
     kernel/metrics.py);
  6. finished requests release their sequence (their end is counted and timed); every
     request with news gets a RequestOutput (new token ids and text; the last one
     carries the Completion).

Failure containment: what belongs to one request (its sampling, stop strings and
detokenization) fails that request alone, with reason "abort" and error_code EIO, logged
once, and the step goes on; what belongs to the batch (the scheduler, the forward pass)
raises out of step(), and the kernel treats that as fatal.

Prompts may come as text, chat messages or token ids. `encode` (kernel/prompts.py;
thread-safe: it reads only the tokenizer) turns text and messages into ids, so a caller
may tokenize elsewhere and hand `add_request` the ids.
"""
from __future__ import annotations

import itertools
import logging
from typing import Callable, Iterable

from llmos.syscalls.types import Completion

from . import tunables
from .account import Account
from .blocks import BlockManager
from .contexts import ContextCalls
from .errors import ContextBusy, EngineError
from .metrics import Meter
from .policy import make_policy
from .prompts import Prompts, continued  # noqa: F401 (continued: re-exported)
from .request import KVContext, Request, RequestOutput, Sequence
from .runner import ModelRunner
from .sampling import SamplingParams, sample
from .scheduler import Scheduler
from .swap import Swapper
from .tokenizer import Tokenizer
from .vm import DiskTier, Pager

log = logging.getLogger("llmos.engine")


class Engine(ContextCalls, Prompts):
    def __init__(self, model, tokenizer: Tokenizer, driver, *, num_blocks: int,
                 block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, num_swap_blocks: int = 0,
                 enable_prefix_caching: bool = True, poison: bool = False,
                 policy: str = tunables.DEFAULT_POLICY, kv_ttl: float = tunables.KV_TTL,
                 kv_disk_blocks: int = 0, kv_disk_dir=None, kv_paging: bool = True,
                 dtype_reason: str = ""):
        cfg = model.config
        self.model, self.tokenizer, self.driver = model, tokenizer, driver
        self.config, self.max_model_len, self.block_size = cfg, max_model_len, block_size
        dtype = model.dtype
        self.dtype_reason = dtype_reason      # why this dtype (load.pick_dtype), for sysinfo
        layout = dict(num_layers=cfg.num_hidden_layers, block_size=block_size,
                      num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype)
        self.kv_caches = driver.allocate_kv_cache(num_blocks=num_blocks, **layout)
        self.kv_bytes = _nbytes(self.kv_caches)       # the device pool (the model table's)
        self.swap_bytes = 0                           # the host swap pool
        on_free = (lambda blocks: driver.poison_blocks(self.kv_caches, blocks)) if poison else None
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching, on_free=on_free)
        self.swapper = None
        if num_swap_blocks > 0:
            host_caches = driver.allocate_swap(num_blocks=num_swap_blocks, **layout)
            self.swap_bytes = _nbytes(host_caches)
            host = BlockManager(num_swap_blocks, block_size, enable_prefix_caching=False,
                                tier="host")
            self.swapper = Swapper(driver, self.kv_caches, host_caches, host)
        self.requests: dict[int, Request] = {}
        self.contexts: dict[int, KVContext] = {}
        disk = DiskTier(kv_disk_dir, kv_disk_blocks, driver, self.kv_caches) \
            if kv_disk_blocks > 0 else None
        self.pager = Pager(self.blocks, self.swapper, self.contexts, kv_ttl, disk)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens,
                                   self._copy_blocks, self.swapper, make_policy(policy),
                                   self.pager if kv_paging else None)
        self.anonymous = Account()      # the account of requests and contexts given none
        self.runner = ModelRunner(model, driver, self.kv_caches, block_size)
        self._context_ids = itertools.count(1)
        self.last_batch: list[Request] = []   # the requests the latest step computed
        self.stats = {"steps": 0, "computed_tokens": 0, "generated_tokens": 0}
        self.meter = Meter()                  # requests' ends and latencies (kernel/metrics.py)

    @classmethod
    def from_pretrained(cls, path_or_name: str, **options) -> "Engine":
        """Load a Hugging Face directory (or "tiny", the embedded model); see load.load_engine."""
        from .load import load_engine
        return load_engine(cls, path_or_name, **options)

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    # ---- requests -------------------------------------------------------------------
    def add_request(self, prompt: str | list[int] | None = None, *, messages: list | None = None,
                    params: SamplingParams | None = None, context: int | None = None,
                    on_event: Callable[[RequestOutput], None] | None = None,
                    salt: bytes | None = None, stream: bool = False, chat: bool = False,
                    request_id: int | None = None, owner: object = None,
                    account: Account | None = None, turn: tuple | None = None,
                    tools: list | None = None, **sampling) -> Request:
        """Queue a request; return it (its `.id`, or request_id if given, names it for
        `abort`; `owner` is an opaque tag for the caller).

        The prompt is text, token ids, or chat `messages`; on a context it is appended to
        the context's tokens. Token ids with chat=True came from the chat template (see
        encode); on a context that has tokens, chat messages go in as the template renders
        them in a conversation (`turn`: Tokenizer.encode_chat_turn of them, computed here
        for `messages`), else without the template's leading BOS; `tools` (OpenAI's) go
        to the template with `messages` (kernel/prompts.py). RequestOutputs
        (returned by step, and given to on_event) carry token ids; with stream=True also
        their text, else the text comes whole in the Completion. Raises EngineError
        (EINVAL) for bad input, NoSuchContext, ContextBusy, or KVOutOfMemory when it
        could never fit in the pool or in its account's kv_blocks limit. `account` is
        charged for it and ranked by the policy (default: the engine's anonymous one).
        """
        account = account or self.anonymous
        params = (params or SamplingParams.from_options(sampling)).check(self.config.vocab_size)
        ctx = self._context(context) if context is not None else None
        tail = ctx.seq.tokens if ctx else []
        if messages is not None or isinstance(prompt, str) or tools is not None:
            prompt, chat = self.encode(prompt, messages, tools=tools), messages is not None
            if messages is not None and tail:
                turn = self.tokenizer.encode_chat_turn(messages, tools=tools)
        tokens = self._token_ids(prompt, chat, tail, turn)
        if ctx is not None and ctx.busy is not None:
            raise ContextBusy(f"context {context} is running request {ctx.busy.id}")
        seq = ctx.seq if ctx else Sequence([], self.blocks.new_table(salt, account))
        total = len(seq.tokens) + len(tokens)
        if total == 0:
            raise EngineError("prompt: empty (give text, token ids or messages)")
        self._check_fits(total, params.max_tokens, account)
        if request_id is not None and request_id in self.requests:
            raise EngineError(f"request id {request_id} is in use")
        paged = self.pager.take(ctx) if ctx else None
        if paged is None and params.max_tokens > 0 and not tokens and seq.num_pending == 0:
            self.blocks.truncate(seq.table, seq.num_computed - 1)   # recompute for logits
        seq.tokens += tokens
        req = Request(seq, params, self.tokenizer, on_event, ctx, stream, owner=owner,
                      account=account, **({} if request_id is None else {"id": request_id}))
        req.swapped, req.stopped = paged, account.stopped
        if ctx:
            ctx.busy = req
        self.requests[req.id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: int) -> bool:
        """Finish a queued or running request with reason "abort"; False if it is not live."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.finish("abort")
        self._release(req)
        self._emit(req)
        return True

    def set_stopped(self, request_id: int, stopped: bool) -> bool:
        """SIGSTOP / SIGCONT of LLM work: a stopped request is not scheduled (it keeps its
        KV until the pool needs it). False if the request is not live."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.stopped = stopped
        return True

    def pause(self, account: Account, stopped: bool) -> None:
        """SIGSTOP / SIGCONT of a process: its requests are not scheduled, and its KV
        (requests and idle contexts) is the first to yield when others need room."""
        account.stopped = stopped
        for req in self.requests.values():
            if req.account is account:
                req.stopped = stopped

    def set_policy(self, name: str) -> None:
        """Switch the scheduling policy (kernel/policy.py). Raises EngineError (EINVAL)
        naming the policies there are."""
        try:
            self.scheduler.set_policy(make_policy(name))
        except ValueError as e:
            raise EngineError(f"policy: {e}") from None

    @property
    def policy(self) -> str:
        return self.scheduler.policy.name

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def wake_in(self) -> float | None:
        """With no work to do now: seconds until throttled work may run (None: none)."""
        return self.scheduler.wake_in()

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step (see the module docstring); return the deltas it produced."""
        batch = self.scheduler.schedule()
        touched = []
        for req in batch.refused:
            req.finish("abort", error=req.refusal or (
                f"out of KV memory: {len(req.seq.tokens)} tokens do not fit in the "
                f"{self.blocks.num_free_blocks} free blocks"))
            touched.append(req)
        self.last_batch = [req for req, _ in batch.items]
        if batch.items:
            sampling, logits = self.runner.run(batch.items)
            before = [len(req.output_ids) for req, _ in batch.items]
            for req, n in batch.items:
                self.blocks.commit_full_blocks(req.seq.table, req.seq.tokens)
                touched.append(req)
            self.stats["steps"] += 1
            self.stats["computed_tokens"] += batch.num_tokens
            self._sample(sampling, logits)
            now = self.scheduler.clock()
            for (req, n), had in zip(batch.items, before):
                decode = n == 1 and had > 0         # the token it computed it had generated
                self.scheduler.charge(req, 0 if decode else n, len(req.output_ids) - had)
                if not had and req.output_ids:
                    self.meter.first_token(req, now)
        deltas = []
        for req in touched:
            if req.finished:
                self._release(req)
            delta = self._emit(req)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _sample(self, reqs: list[Request], logits) -> None:
        live = [r for r in reqs if r.params.max_tokens > 0]
        for req in reqs:
            if req.params.max_tokens == 0:
                req.finish("length")
        if not live:
            return
        if len(live) < len(reqs):
            logits = logits[[i for i, r in enumerate(reqs) if r.params.max_tokens > 0]]
        tokens = sample(logits, [r.params for r in live], [r.generator for r in live])
        eos = self.tokenizer.eos_token_ids
        for req, tok in zip(live, tokens):    # a failed one is released by step()
            if isinstance(tok, Exception):     # its own sampling raised
                self._fail(req, tok)
                continue
            try:
                req.append(tok, eos)
            except Exception as exc:          # noqa: BLE001 — its own stop strings, decoding
                self._fail(req, exc)
                continue
            self.stats["generated_tokens"] += 1

    def _fail(self, req: Request, exc: Exception) -> None:
        """Finish a request whose own processing raised: EIO to its caller, and a log line."""
        log.error("request %d failed; the engine goes on without it", req.id, exc_info=exc)
        req.fail(f"internal error in this request: {type(exc).__name__}: {exc} (see the kernel log)")

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.driver.copy_blocks(self.kv_caches, [s for s, _ in pairs], [d for _, d in pairs])

    def _release(self, req: Request) -> None:
        """req finished: it leaves the scheduler and gives back its KV (once per request)."""
        self.meter.finished(req, self.scheduler.clock())
        self.scheduler.remove(req)
        paged, req.swapped = req.swapped, None
        self.requests.pop(req.id, None)
        if req.context is not None:
            req.context.busy = None
            req.context.last_used = self.scheduler.clock()
            if paged is not None:
                self.pager.give_back(req.context, paged)
        else:
            self.pager.drop(paged)
            self.blocks.free(req.seq.table)

    def _emit(self, req: Request) -> RequestOutput | None:
        """Give the request's news to on_event and return it. A request whose text cannot
        be decoded fails (released if it was still live); a failed one decodes nothing."""
        try:
            delta = req.take_delta()
        except Exception as exc:          # noqa: BLE001 — its own detokenization
            live = not req.finished       # a finished request was released by the caller
            self._fail(req, exc)
            if live:
                self._release(req)
            delta = req.take_delta()
        if delta is not None and req.on_event is not None:
            req.on_event(delta)
        return delta

    # ---- batch convenience ----------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]], **sampling) -> list[Completion]:
        """Run every prompt to completion, batched; one Completion each, in order."""
        reqs = [self.add_request(p, **sampling) for p in prompts]
        done: dict[int, Completion] = {}
        while len(done) < len(reqs) and self.has_work():
            done.update((d.request_id, d.completion) for d in self.step() if d.finished)
        return [done[r.id] for r in reqs]


def _nbytes(caches) -> int:
    """Bytes of a pool: its K and V tensors of every layer."""
    return sum(t.numel() * t.element_size() for kv in caches for t in kv)
