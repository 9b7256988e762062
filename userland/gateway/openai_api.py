"""The OpenAI API's shapes, on our side: a request body checked and turned into the SDK's
generate arguments, and Completions turned into the response objects and stream chunks
OpenAI's clients expect. No I/O here.

Refused with 400 and the parameter's name (never silently ignored): n != 1, logprobs,
echo, best_of, a non-text response_format, non-zero penalties, logit_bias. Accepted as
vLLM does in `extra_body`: top_k, min_p, ignore_eos. Parameters that change nothing here
(user, metadata, store, parallel_tool_calls, ...) are ignored, as by OpenAI's own server.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from llmos.userland.gateway.errors import ApiError

FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


@dataclass
class Ask:
    """A checked request: what to send to the kernel, and how to answer."""
    kind: str                          # "chat" or "text"
    model: str
    source: dict                       # messages= or prompt=/token_ids=, and tools=
    sampling: dict                     # max_tokens, temperature, ... as the SDK takes them
    stream: bool = False
    include_usage: bool = False
    tools: list = field(default_factory=list)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def chat_request(body: dict) -> Ask:
    """A /v1/chat/completions body, checked. Raises ApiError (400) naming the parameter."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: a non-empty list of messages is required", "messages")
    tools = _tools(body)
    source = {"messages": [_message(i, m) for i, m in enumerate(messages)]}
    if tools:
        source["tools"] = tools
    return _ask("chat", body, source, tools)


def completion_request(body: dict) -> Ask:
    """A /v1/completions body, checked. Raises ApiError (400)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                          # a batch of one
    if isinstance(prompt, str):
        source = {"prompt": prompt}
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        source = {"token_ids": prompt}
    else:
        raise ApiError(400, "prompt: a string or a list of token ids (a batch of more than "
                            "one prompt is not supported)", "prompt")
    if body.get("echo"):
        raise ApiError(400, "echo: not supported", "echo")
    if body.get("suffix"):
        raise ApiError(400, "suffix: not supported", "suffix")
    return _ask("text", body, source, [])


def _ask(kind: str, body: dict, source: dict, tools: list) -> Ask:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: the model's name is required (GET /v1/models lists them)",
                       "model")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: an object", "stream_options")
    return Ask(kind, model, source, _sampling(body), bool(body.get("stream")),
               bool(options.get("include_usage")), tools)


def _sampling(body: dict) -> dict:
    """The SDK's generate options from the body; the kernel checks their ranges."""
    for name, ok in (("n", lambda v: v in (None, 1)), ("best_of", lambda v: v in (None, 1)),
                     ("logprobs", lambda v: not v), ("top_logprobs", lambda v: not v),
                     ("presence_penalty", lambda v: not v), ("frequency_penalty", lambda v: not v),
                     ("logit_bias", lambda v: not v),
                     ("response_format", lambda v: v in (None, {"type": "text"}))):
        if not ok(body.get(name)):
            raise ApiError(400, f"{name}: {body.get(name)!r} is not supported", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    if not (stop is None or isinstance(stop, str)
            or isinstance(stop, list) and all(isinstance(x, str) for x in stop)):
        raise ApiError(400, "stop: a string or a list of strings", "stop")
    sampling = {"max_tokens": max_tokens, "temperature": body.get("temperature"),
                "top_p": body.get("top_p"), "seed": body.get("seed"),
                "stop": [stop] if isinstance(stop, str) else stop,
                "top_k": body.get("top_k"), "min_p": body.get("min_p"),
                "ignore_eos": body.get("ignore_eos")}
    return {k: v for k, v in sampling.items() if v is not None}


def _message(i: int, m) -> dict:
    """One chat message as the kernel takes it: content parts joined into text."""
    if not isinstance(m, dict):
        raise ApiError(400, f"messages[{i}]: an object with role and content", "messages")
    out = {k: v for k, v in m.items() if k in ("role", "content", "tool_calls", "tool_call_id",
                                                "name") and v is not None}
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               "messages")
            texts.append(part.get("text", ""))
        out["content"] = "".join(texts)
    if out.get("role") == "developer":
        out["role"] = "system"                    # OpenAI's newer name for it
    if out.get("role") != "assistant" or "tool_calls" not in out:
        out.setdefault("content", "")
    if out.get("role") != "tool":
        out.pop("name", None)                     # a participant's name: templates ignore it
    return out


def _tools(body: dict) -> list:
    """The tools the template is given: none when tool_choice is "none". A call cannot
    be forced ("required", a named function): the model decides, so that is refused."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise ApiError(400, "tools: a list of tools", "tools")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice: {choice!r} is not supported (auto or none: the "
                            "model decides whether to call a tool)", "tool_choice")
    return [] if choice == "none" else tools


# ---- answers ---------------------------------------------------------------------------------

def usage(u) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def response(ask: Ask, done, reply: dict | None = None) -> dict:
    """The whole answer to ask: its Completion `done`; reply: a chat message already made
    (with tool_calls) instead of done's text."""
    finish = FINISH.get(done.finish_reason, done.finish_reason)
    if ask.kind == "text":
        choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": finish}
        return {"id": f"cmpl-{ask.id}", "object": "text_completion", "created": ask.created,
                "model": ask.model, "choices": [choice], "usage": usage(done.usage)}
    message = reply or {"role": "assistant", "content": done.text}
    if message.get("tool_calls"):
        finish = "tool_calls"
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {"id": f"chatcmpl-{ask.id}", "object": "chat.completion", "created": ask.created,
            "model": ask.model, "choices": [choice], "usage": usage(done.usage),
            "system_fingerprint": None}


def chunk(ask: Ask, delta: dict | None = None, text: str | None = None,
          finish: str | None = None, usage_: dict | None = None) -> dict:
    """One stream chunk: a chat delta, or a completion's text; the last carries finish
    (and, asked for by stream_options.include_usage, a chunk of its own with usage)."""
    if usage_ is not None:
        choices = []
    elif ask.kind == "text":
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    obj = {"id": f"{'cmpl' if ask.kind == 'text' else 'chatcmpl'}-{ask.id}",
           "object": "text_completion" if ask.kind == "text" else "chat.completion.chunk",
           "created": ask.created, "model": ask.model, "choices": choices}
    if usage_ is not None:
        obj["usage"] = usage_
    return obj


def finish_of(done, reply: dict | None = None) -> str:
    if reply and reply.get("tool_calls"):
        return "tool_calls"
    return FINISH.get(done.finish_reason, done.finish_reason)
