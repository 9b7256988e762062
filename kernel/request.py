"""KV sequences, contexts and requests: the engine's units of work and their output.

A `Sequence` is a list of tokens plus the block table that holds the KV of the first
`num_computed` of them. A `KVContext` owns a sequence across requests (a conversation);
an ephemeral request owns a fresh one. A `Request` runs on a sequence: it appends its
prompt, then one sampled token per step, and turns tokens into text deltas that never
split a UTF-8 character and never show a stop string.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from llmos.syscalls.errors import EIO, ENOMEM
from llmos.syscalls.types import Completion, Usage

from .blocks import BlockTable
from .sampling import SamplingParams
from .tokenizer import DetokenizeStream, Tokenizer


@dataclass
class Sequence:
    tokens: list[int]
    table: BlockTable

    @property
    def num_computed(self) -> int:
        """Tokens whose KV is in the cache (slots are assigned and filled in the same step)."""
        return self.table.num_tokens

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.table.num_tokens


@dataclass
class KVContext:
    id: int
    seq: Sequence
    busy: "Request | None" = None    # at most one request runs on a context at a time
    owner: object = None             # the caller's tag (the kernel: the owning process)
    account: object = None           # whose memory it is (kernel/account.py)
    paged: object = None             # its KV while paged out (kernel/vm.py), else None
    last_used: float = 0.0           # time.monotonic() of its last request (the TTL's clock)


@dataclass
class RequestOutput:
    """One step's news of a request: new tokens and text; the last one carries the
    Completion, and `error` when the request was refused (ENOMEM) or failed (EIO) rather
    than ran to its end: then its call fails with `error_code`."""
    request_id: int
    token_ids: list[int]
    text: str
    completion: Completion | None = None
    error: str | None = None
    error_code: str = ENOMEM

    @property
    def finished(self) -> bool:
        return self.completion is not None


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    seq: Sequence
    params: SamplingParams
    tokenizer: Tokenizer
    on_event: Callable[[RequestOutput], None] | None = None
    context: KVContext | None = None
    stream: bool = False          # decode text deltas as tokens come (else text at the end)
    id: int = field(default_factory=lambda: next(_ids))
    owner: object = None          # the caller's tag (the kernel: the owning process)
    account: object = None        # who is charged for it and ranked (kernel/account.py)

    def __post_init__(self):
        self.output_start = len(self.seq.tokens)
        self.output_ids: list[int] = []   # this request's tokens (a context's sequence goes on)
        self.cached_tokens = 0        # prompt tokens found in the cache when admitted
        self.started = False          # admitted once (cached_tokens is then known)
        self.stopped = False          # SIGSTOP: not scheduled until resumed
        self.swapped = None           # its KV while preempted or paged out: a host
                                      # BlockTable or a DiskImage (kernel/vm.py)
        self.arrived = 0.0            # time.monotonic() when queued (the policies' clock)
        self.first_token_at: float | None = None   # ...and when its first token came
        self.refusal: str | None = None   # why the scheduler refused it, if it did
        self.finish_reason: str | None = None
        self.stop_hit = False         # ended by a stop string: the text is already cut
        self.error: str | None = None
        self.error_code = ENOMEM      # what the call fails with when error is set
        self.generator = None
        if self.params.seed is not None and not self.params.greedy:
            self.generator = torch.Generator().manual_seed(self.params.seed)
        # Incremental decoding costs a decode per token: only for text deltas and stop strings.
        streaming = self.stream or bool(self.params.stop)
        self.detok = DetokenizeStream(tokenizer=self.tokenizer) if streaming else None
        self.text = ""                # decoded so far (streaming or stop strings only)
        self.emitted = 0              # chars of self.text already sent as deltas
        self.unsent: list[int] = []   # tokens not yet sent as a delta
        self.holdback = max((len(s) for s in self.params.stop), default=1) - 1

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, eos_ids: list[int]) -> None:
        """Take one sampled token; decide whether the request is finished."""
        self.seq.tokens.append(token)
        self.output_ids.append(token)
        self.unsent.append(token)
        p = self.params
        if self.detok is not None:
            before = len(self.text)
            self.text += self.detok.push(token)
            if self._find_stop(before):
                return
        if token in p.stop_token_ids or (not p.ignore_eos and token in eos_ids):
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"

    def _find_stop(self, searched_up_to: int) -> bool:
        start = max(0, searched_up_to - self.holdback)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.finish_reason, self.stop_hit = "stop", True
        return bool(hits)

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error

    def fail(self, error: str) -> None:
        """Finish after an internal failure confined to this request (EIO). Nothing more
        is decoded: the last delta carries no text, the Completion what was already sent."""
        self.finish("abort", error)
        self.error_code = EIO

    @property
    def failed(self) -> bool:
        return self.error_code == EIO

    @property
    def usage(self) -> Usage:
        return Usage(self.output_start, self.cached_tokens, len(self.output_ids))

    def take_delta(self) -> RequestOutput | None:
        """The event to send after a step: None when there is nothing new to say."""
        if self.finished:
            if self.failed:
                text = self.text[:self.emitted]
            elif self.detok is not None:
                if not self.stop_hit:
                    self.text += self.detok.flush()
                text = self.text
            else:
                text = self.tokenizer.decode(self.output_ids)
            completion = Completion(text, list(self.output_ids), self.finish_reason, self.usage)
            delta = RequestOutput(self.id, self.unsent, text[self.emitted:], completion,
                                  self.error, self.error_code)
        else:
            upto = max(self.emitted, len(self.text) - self.holdback)
            if not self.unsent and upto == self.emitted:
                return None
            delta = RequestOutput(self.id, self.unsent, self.text[self.emitted:upto])
            self.emitted = upto
        self.unsent = []
        return delta
