"""LLM syscalls: generate, cancel, contexts, tokenize. Decode, call the kernel, return.

Each runs on the I/O thread as `sys_x(kernel, call, args)`; the engine thread (or a
tokenizer worker) answers the call later, so most return PENDING.
"""
from __future__ import annotations

from .syscall import PENDING


def sys_generate(k, call, a):
    k.generate(call, call.conn.pid, a)
    return PENDING


def sys_cancel(k, call, a):
    k.cancel(call, call.conn.pid, a["call"])
    return {}


def sys_context_create(k, call, a):
    k.context_create(call, call.conn.pid, a["model"], a["system"], a["messages"], a["share"],
                     a["tools"])
    return PENDING


def sys_context_fork(k, call, a):
    k.context_fork(call, call.conn.pid, a["context"])
    return PENDING


def sys_context_free(k, call, a):
    k.context_free(call, call.conn.pid, a["context"])
    return PENDING


def sys_context_info(k, call, a):
    k.context_info(call, call.conn.pid, a["context"])
    return PENDING


def sys_tokenize(k, call, a):
    k.tokenize(call, a["model"], a["text"])
    return PENDING


def sys_detokenize(k, call, a):
    k.detokenize(call, a["model"], a["token_ids"])
    return PENDING
