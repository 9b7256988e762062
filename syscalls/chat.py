"""Chat arguments: messages as OpenAI's chat API sends them (tool calls included), and
JSON data (the `tools` a chat template lists). Argument types of the language of
syscalls/args.py: each returns a checked copy or raises SyscallError naming the part that
is wrong ("messages[2].tool_calls[0].id", "tools[0]['function']").
"""
from __future__ import annotations

import json
import math

from .args import Arg, List, Str, _bad, _type_of
from .errors import E2BIG


class Json(Arg):
    """JSON data: maps with str keys, lists, str, int, finite float, bool and nil, at most
    `max_depth` maps and lists deep (EINVAL) and at most `max_bytes` long as compact UTF-8
    JSON (E2BIG). With `objects`, the value is a list of at most that many maps (OpenAI's
    `tools`: E2BIG past it). Returns a copy made of dicts and lists."""
    kind = "json"

    def __init__(self, objects: int | None = None, max_depth: int = 16,
                 max_bytes: int = 256 << 10, **kw):
        super().__init__(**kw)
        self.objects, self.max_depth, self.max_bytes = objects, max_depth, max_bytes

    def check(self, name, value):
        if self.objects is not None:
            self._expect(name, value, (list, tuple), "list of maps")
            if len(value) > self.objects:
                _bad(name, f"too long ({len(value)} > {self.objects} items)", E2BIG)
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    _bad(f"{name}[{i}]", f"expected a map, got {_type_of(v)}")
        out = self._plain(name, value, 1)
        size = len(json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode())
        if size > self.max_bytes:
            _bad(name, f"too large ({size} > {self.max_bytes} bytes as JSON)", E2BIG)
        return out

    def _plain(self, name: str, v, depth: int):
        """v as plain JSON data; depth: the maps and lists v is inside of, itself included."""
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            if not math.isfinite(v):
                _bad(name, f"expected a finite float, got {v}")
            return v
        if not isinstance(v, (dict, list, tuple)):
            _bad(name, f"expected JSON data (map, list, str, number, bool or nil), "
                       f"got {_type_of(v)}")
        if depth > self.max_depth:
            _bad(name, f"nested deeper than {self.max_depth} maps and lists")
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, str):
                    _bad(f"{name} key", f"expected str, got {_type_of(k)}")
            return {k: self._plain(f"{name}[{k!r}]", x, depth + 1) for k, x in v.items()}
        return [self._plain(f"{name}[{i}]", x, depth + 1) for i, x in enumerate(v)]

    def _limits(self):
        return {"objects": self.objects, "max_depth": self.max_depth,
                "max_bytes": self.max_bytes}


class Tools(Json):
    """OpenAI's `tools`: a list of {"type": "function", "function": {"name": str,
    "description": str, "parameters": map}}, as chat templates read them (a template
    given anything else fails inside itself, with nothing to tell the caller)."""
    kind = "tools"

    def check(self, name, value):
        tools = super().check(name, value)
        for i, t in enumerate(tools):
            at = f"{name}[{i}]"
            _fields(at, t, ("type", "function"), ("function",))
            if t.get("type", "function") != "function":
                _bad(f"{at}.type", f"expected \"function\", got {t['type']!r}")
            f = t["function"]
            if not isinstance(f, dict):
                _bad(f"{at}.function", f"expected a map, got {_type_of(f)}")
            _fields(f"{at}.function", f, ("name", "description", "parameters", "strict"),
                    ("name",))
            if not isinstance(f["name"], str) or not f["name"]:
                _bad(f"{at}.function.name", "expected a non-empty str")
            if not isinstance(f.get("description", ""), str):
                _bad(f"{at}.function.description", "expected a str")
            if not isinstance(f.get("parameters", {}), dict):
                _bad(f"{at}.function.parameters", "expected a map (a JSON schema)")
        return tools


def _fields(name: str, m: dict, allowed: tuple, required: tuple) -> None:
    """m has no key but `allowed` ones, and every `required` one (nil counts as absent)."""
    for key in m:
        if key not in allowed:
            _bad(f"{name}.{key}", f"unknown field (one of {', '.join(allowed)})")
    for key in required:
        if m.get(key) is None:
            _bad(f"{name}.{key}", "missing")


class ToolCall(Arg):
    """One call of an assistant message, as OpenAI sends it: {"id": str, "type":
    "function" (may be absent), "function": {"name": str, "arguments": str (JSON text)}};
    no other key. Returns it as given, checked."""
    kind = "tool_call"

    def __init__(self, arguments_len: int = 4 << 20, **kw):
        super().__init__(**kw)
        self.id, self.type = Str(256), Str(16, choices=("function",))
        self.name, self.arguments = Str(256, min_len=1), Str(arguments_len)

    def check(self, name, value):
        self._expect(name, value, (dict,), "map")
        _fields(name, value, ("id", "type", "function"), ("id", "function"))
        fn, where = value["function"], f"{name}.function"
        self._expect(where, fn, (dict,), "map")
        _fields(where, fn, ("name", "arguments"), ("name", "arguments"))
        out = {"id": self.id.check(f"{name}.id", value["id"])}
        if value.get("type") is not None:
            out["type"] = self.type.check(f"{name}.type", value["type"])
        out["function"] = {"name": self.name.check(f"{where}.name", fn["name"]),
                           "arguments": self.arguments.check(f"{where}.arguments",
                                                             fn["arguments"])}
        return out


class Messages(Arg):
    """Chat messages as OpenAI's chat API sends them: a non-empty list of maps, each with
    "role" (one of ROLES) and "content" (str). An assistant message may carry "tool_calls"
    (at most TOOL_CALLS, each a ToolCall; with some, its content may be nil or absent), a
    tool message "tool_call_id" and "name". Any other key, or one of these on another
    role, is EINVAL naming it. Returns the messages as given, checked."""
    kind = "messages"
    ROLES = ("system", "user", "assistant", "tool")
    TOOL_CALLS = 128
    EXTRA = {"assistant": ("tool_calls",), "tool": ("tool_call_id", "name")}   # by role
    FIELDS = ("role", "content", "tool_calls", "tool_call_id", "name")

    def __init__(self, max_len=4096, content_len=4 << 20, **kw):
        super().__init__(**kw)
        self.max_len, self.content_len = max_len, content_len
        self.role, self.content = Str(16, choices=self.ROLES), Str(content_len)
        self.tool_calls = List(ToolCall(content_len), max_len=self.TOOL_CALLS)
        self.ident = Str(256)             # tool_call_id, and the name of a tool's reply

    def check(self, name, value):
        self._expect(name, value, (list, tuple), "list of messages")
        if not value:
            _bad(name, "needs at least one message")
        if len(value) > self.max_len:
            _bad(name, f"too many messages ({len(value)} > {self.max_len})", E2BIG)
        return [self._message(f"{name}[{i}]", m) for i, m in enumerate(value)]

    def _message(self, name, m):
        if not isinstance(m, dict):
            _bad(name, f"expected a map with role and content, got {_type_of(m)}")
        for key in m:
            if key not in self.FIELDS:
                _bad(f"{name}.{key}", "unknown message field")
        if "role" not in m:
            _bad(f"{name}.role", "missing")
        role = self.role.check(f"{name}.role", m["role"])
        for key in m:
            if key not in ("role", "content") and key not in self.EXTRA.get(role, ()):
                owner = next(r for r, keys in self.EXTRA.items() if key in keys)
                _bad(f"{name}.{key}", f"unknown field of a {role} message (only of {owner} "
                                      f"messages)")
        calls = None if m.get("tool_calls") is None else \
            self.tool_calls.check(f"{name}.tool_calls", m["tool_calls"])
        out = {"role": role}
        if m.get("content") is not None or not calls:
            if "content" not in m:
                _bad(f"{name}.content", "missing")
            out["content"] = self.content.check(f"{name}.content", m["content"])
        elif "content" in m:
            out["content"] = None             # an assistant's calls without text
        if calls is not None:
            out["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                out[key] = self.ident.check(f"{name}.{key}", m[key])
        return out

    def _limits(self):
        return {"max_len": self.max_len, "content_len": self.content_len,
                "roles": list(self.ROLES), "tool_calls": self.TOOL_CALLS}
