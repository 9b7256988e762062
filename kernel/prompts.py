"""Prompts: how what a caller gives (text, token ids, chat messages with their tools)
becomes the checked token ids a request or a context appends, and whether they fit.

A part of the Engine (kernel/engine.py) of its own, as kernel/contexts.py is: it reads
the engine's tokenizer, config, context length and pool size. `encode` only reads the
tokenizer (thread-safe); the rest is engine thread only.
"""
from __future__ import annotations

import math

from .account import KV_LIMIT, Account
from .errors import EngineError, KVOutOfMemory


def continued(tail: list[int], closing: list[int], turn: list[int]) -> list[int]:
    """A chat turn after tokens ending in tail: the template's closing of the message
    before it, less the part tail has already (a reply that stopped at `<|im_end|>` lacks
    only the newline; a system prompt rendered alone has all of it), then the turn."""
    have = next((k for k in range(min(len(closing), len(tail)), 0, -1)
                 if tail[-k:] == closing[:k]), 0)
    return closing[have:] + turn


class Prompts:
    def encode(self, prompt: str | list[int] | None = None, messages: list | None = None,
               reply: bool = True, tools: list | None = None) -> list[int]:
        """Token ids of exactly one of prompt (text or ids) and chat messages (rendered
        with OpenAI's `tools`). `reply`: messages end with the template's prompt for the
        assistant's turn. Thread-safe. Raises EngineError naming what is wrong."""
        if (prompt is None) == (messages is None):
            raise EngineError("prompt: give exactly one of prompt text, token ids or messages")
        if messages is not None:
            try:
                return self.tokenizer.encode_chat(messages, add_generation_prompt=reply,
                                                  tools=tools)
            except ValueError as e:     # no template, malformed messages, raise_exception()
                raise EngineError(f"messages: {e}") from None
        if tools is not None:
            raise EngineError("tools: given only with messages (the chat template lists them)")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return self._token_ids(prompt, chat=False, tail=[])

    def _token_ids(self, prompt, chat: bool, tail: list[int], turn: tuple | None = None
                   ) -> list[int]:
        """Checked token ids. Chat ids continuing a conversation (whose tokens so far end
        in tail) are its `turn` when the template gives one (continued), else they lose
        the template's BOS (it begins the context)."""
        if not isinstance(prompt, (list, tuple)):
            raise EngineError(f"prompt: text or a list of token ids, got {type(prompt).__name__}")
        tokens = list(prompt)
        vocab = self.config.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                   for t in tokens):
            raise EngineError(f"prompt: token ids must be integers in [0, {vocab})")
        if not (chat and tail):
            return tokens
        if turn is not None:
            return continued(tail, *turn)
        bos = self.tokenizer.token_to_id(self.tokenizer.bos_token or "")
        return tokens[1:] if tokens[:1] == [bos] else tokens

    def _check_fits(self, prompt_len: int, max_tokens: int, account: Account | None = None) -> None:
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise EngineError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds "
                              f"the model's context length {self.max_model_len}")
        need = math.ceil(total / self.block_size)
        if need > self.num_blocks:
            raise KVOutOfMemory(f"request needs {need} KV blocks but the pool holds "
                                f"{self.num_blocks}")
        limit = account.limits.kv_blocks if account is not None else None
        if limit is not None and need > limit:
            raise KVOutOfMemory(f"{KV_LIMIT} ({limit}) exceeded: prompt ({prompt_len} "
                                f"tokens) + max_tokens ({max_tokens}) need {need} KV blocks")
