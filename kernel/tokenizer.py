"""Tokenizer: a Hugging Face tokenizer.json, its chat template, and streaming detokenization.

Built on the `tokenizers` library and jinja2 only (the runtime never imports
transformers), but it gives the same ids and the same rendered chat text as
`transformers.AutoTokenizer` on the same directory.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

from .config import CheckpointError, read_json

# Named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
GIL_FREE_ABOVE = 4096          # characters (or ids) from which encode/decode release the GIL


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template refused the messages."""


class Tokenizer:
    """Encode/decode and chat rendering for one model directory. Immutable after load."""

    def __init__(self, backend: _HFTokenizer, special_tokens: dict[str, str],
                 eos_token_ids: list[int], chat_template: str | None, source: str):
        self._tok = backend
        self.special_tokens = special_tokens  # bos_token, eos_token, ... -> token text
        self.bos_token: str | None = special_tokens.get("bos_token")
        self.eos_token: str | None = special_tokens.get("eos_token")
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.source = source
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja, generation_config.json).

        Raises CheckpointError naming the file that is missing or unreadable.
        """
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer.json is missing")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises bare Exception for any bad file
            raise CheckpointError(f"{file}: cannot load tokenizer: {e}") from None
        # transformers disables truncation and padding unless a call asks for them.
        backend.no_truncation()
        backend.no_padding()
        tok_config = read_json(path / "tokenizer_config.json", missing_ok=True)
        special = {name: _token_text(tok_config.get(name)) for name in _SPECIAL_TOKEN_NAMES}
        special = {name: text for name, text in special.items() if text is not None}
        # As transformers does: a named special token missing from the vocabulary is added.
        missing = [t for t in special.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        return cls(backend, special, _eos_ids(path, backend, special.get("eos_token")),
                   _chat_template(path, tok_config), str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (len() in transformers)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def tool_format(self) -> str:
        """How the chat template writes the assistant's tool calls: "hermes" when it has
        `<tool_call>` (Hermes, Qwen: `<tool_call>{"name": ..., "arguments": ...}</tool_call>`),
        else "" (none that the kernel knows)."""
        return "hermes" if self.chat_template and "<tool_call>" in self.chat_template else ""

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text. Long texts go through the batch call, which releases the
        GIL (the single-text call holds it: 1 s for 400K characters, a stall for every
        other thread of the kernel)."""
        if len(text) < GIL_FREE_ABOVE:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) < GIL_FREE_ABOVE:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._tok.decode_batch([list(ids)], skip_special_tokens=skip_special_tokens)[0]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render messages with the model's chat template, as transformers does (tokenize=False).

        Raises ChatTemplateError if the model has none or the template rejects the messages.
        """
        if self._template is None:
            if self.chat_template is None:
                raise ChatTemplateError(f"{self.source}: the model has no chat template "
                                        "(neither chat_template.jinja nor 'chat_template' in tokenizer_config.json)")
            try:
                self._template = _jinja_env().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"{self.source}: chat template does not compile: {e}") from None
        context = {**self.special_tokens, **kwargs}
        context.setdefault("tools", None)
        context.setdefault("documents", None)
        try:
            return self._template.render(messages=_normalize_messages(messages),
                                         add_generation_prompt=add_generation_prompt, **context)
        except Exception as e:        # noqa: BLE001 the template's own errors (TypeError...) too
            raise ChatTemplateError(f"chat template: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Ids of the rendered chat; the template adds its own special tokens."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)

    def encode_chat_turn(self, messages: list[dict], add_generation_prompt: bool = True,
                         tools: list | None = None) -> tuple[list[int], list[int]] | None:
        """Messages that continue a conversation, as the template renders them there:
        (closing, turn) ids, where closing is what the template puts after a message's
        content (`<|im_end|>\n`) and turn the messages themselves, without what the
        template puts only at the start (BOS, a default system prompt, and the `tools`
        where a template lists them in its first system block). None if the template does
        not render a conversation as a prefix of its continuation.

        Found by rendering a probe exchange alone and followed by the messages, both with
        `tools`: the turn is what the second adds to the first."""
        probe = [{"role": "user", "content": _PROBE_USER},
                 {"role": "assistant", "content": _PROBE_REPLY}]
        try:
            alone = self.apply_chat_template(probe, add_generation_prompt=False, tools=tools)
            both = self.apply_chat_template(probe + list(messages), add_generation_prompt,
                                            tools=tools)
        except ChatTemplateError:
            return None
        end = alone.find(_PROBE_REPLY) + len(_PROBE_REPLY)
        if end < len(_PROBE_REPLY) or not both.startswith(alone):
            return None
        return (self.encode(alone[end:], add_special_tokens=False),
                self.encode(both[len(alone):], add_special_tokens=False))


# A probe exchange (encode_chat_turn): contents no real message has.
_PROBE_USER, _PROBE_REPLY = "\x01llmos-probe-user\x01", "\x01llmos-probe-reply\x01"


class DetokenizeStream:
    """Incremental detokenizer: push ids one at a time, get text deltas.

    Uses the prefix_offset/read_offset method of TGI/vLLM: each step decodes only a short
    window of recent ids and emits what it adds past the previous window, holding text
    back while it ends in an incomplete UTF-8 sequence ('\\ufffd'). For byte-level BPE
    tokenizers the deltas concatenate to decode(all pushed ids).
    """

    _CONTEXT = 5  # prompt ids decoded as left context (some decoders drop a leading space)

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT:]) if prompt_ids else []
        self._prefix_offset = 0           # start of the window decoded as left context
        self._read_offset = len(self._ids)  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is partial)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is held back (an incomplete sequence decodes to '\\ufffd', as decode does)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        text = decode(self._ids[self._prefix_offset:], skip_special_tokens=skip)
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        # Ids before the new window are never decoded again: drop them to keep memory O(window).
        del self._ids[:self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return text[len(prefix):]


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (utils/chat_template_utils.py)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson, which would HTML-escape the text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we just render it."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _normalize_messages(messages: list[dict]) -> list[dict]:
    # Drop None-valued keys, copy reasoning under the names templates read (as
    # transformers), and give tool calls' arguments as maps (as vLLM does).
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_call_with_map(c) for c in m["tool_calls"]]
        out.append(m)
    return out


def _call_with_map(call):
    """A tool call whose function's arguments are JSON text (OpenAI's form) with them as a
    map, which is what templates expect (transformers' docs): Qwen2.5's renders them with
    `tojson`, and text would come out quoted. Text that is not a JSON object becomes {}
    (as vLLM: the call stays in the conversation; failing it would fail every later turn)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        arguments = json.loads(fn["arguments"])
    except (ValueError, RecursionError):      # not JSON; nested past the parser's stack
        arguments = None
    return {**call, "function": {**fn, "arguments": arguments
                                 if isinstance(arguments, dict) else {}}}


def _chat_template(path: Path, tok_config: dict) -> str | None:
    # transformers v5 writes chat_template.jinja; it takes priority over tokenizer_config.json.
    file = path / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # older form: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _eos_ids(path: Path, backend: _HFTokenizer, eos_token: str | None) -> list[int]:
    for name in ("generation_config.json", "config.json"):
        v = read_json(path / name, missing_ok=True).get("eos_token_id")
        if v is not None:
            ids = [v] if isinstance(v, int) else v
            if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise CheckpointError(f"{path / name}: 'eos_token_id' must be an id or a list of ids, got {v!r}")
            return ids
    eos_id = backend.token_to_id(eos_token) if eos_token else None
    return [] if eos_id is None else [eos_id]


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json stores a special token as text or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
