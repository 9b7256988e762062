"""Wire format v1: msgpack maps in ZeroMQ frames, nothing else.

    request  {"v": 1, "id": int, "nr": int, "a": {args}}        then optional binary frames
    reply    {"v": 1, "id": int, "ok": true,  "r": result}
    error    {"v": 1, "id": int, "ok": false, "e": {"code": str, "msg": str}}
    event    {"v": 1, "id": int, "ev": "delta", "r": {...}}      before a streaming call's reply

Decoding is bounded (sizes of the whole message, of strings, binaries, arrays and maps),
refuses ext types, never unpickles, and raises WireError with a precise code and message.
A request whose header is undecodable has no usable id: the server answers it with
"id": null and EPROTO (see server.py), so a raw peer learns why; the client drops it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from .errors import E2BIG, EPROTO, WireError

VERSION = 1
MAX_MESSAGE = 16 << 20       # bytes in one frame: a 1M-token prompt as int list fits
MAX_STR = 8 << 20            # bytes in one string
MAX_BIN = 16 << 20           # bytes in one binary
MAX_ARRAY = 1 << 21          # items in one array (token ids)
MAX_MAP = 1 << 12            # keys in one map
MAX_CONTAINERS = 1 << 16     # maps and arrays in one message: an empty map is 1 byte on the
                             # wire but ~64 in memory, so a frame of them would grow 64-fold
MAX_ID = (1 << 63) - 1       # call ids are non-negative int64


class WireRequest(NamedTuple):
    id: int
    nr: int
    args: dict
    frames: tuple            # the optional binary frames after the header


class Reply(NamedTuple):
    """A decoded reply or event: kind is "ok", "error" or "event"; body is r, (code, msg) or r."""
    id: Any
    kind: str
    body: Any


def _refuse_ext(code: int, data: bytes):
    raise ValueError(f"ext type {code} refused")


class _ContainerBudget:
    """Counts the maps and arrays the decoder builds; past MAX_CONTAINERS it stops the decode."""
    __slots__ = ("left",)

    def __init__(self):
        self.left = MAX_CONTAINERS

    def __call__(self, obj):
        self.left -= 1
        if self.left < 0:
            raise _TooMany
        return obj


class _TooMany(Exception):
    pass


def unpack(frame: bytes, max_message: int = MAX_MESSAGE) -> Any:
    """Decode one frame. Raises WireError E2BIG (over a size limit, including more than
    MAX_CONTAINERS maps and arrays) or EPROTO (anything else)."""
    if len(frame) > max_message:
        raise WireError(E2BIG, f"message of {len(frame)} bytes exceeds {max_message}")
    # Every map or array takes a byte at least: a smaller frame cannot pass the budget,
    # and skips the hooks (a Python call per container on the syscall path).
    hooks = {}
    if len(frame) > MAX_CONTAINERS:
        budget = _ContainerBudget()
        hooks = {"list_hook": budget, "object_hook": budget}
    try:
        return msgpack.unpackb(
            frame, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True, **hooks,
            max_str_len=min(MAX_STR, max_message),
            max_bin_len=min(MAX_BIN, max_message), max_array_len=MAX_ARRAY,
            max_map_len=MAX_MAP, max_ext_len=0)
    except _TooMany:
        raise WireError(E2BIG, f"message holds more than {MAX_CONTAINERS} maps and arrays") from None
    except ValueError as e:     # FormatError, ExtraData, StackError, UnicodeDecodeError too
        if "max_ext_len" in str(e):     # max_ext_len=0 refuses every ext type, timestamps too
            raise WireError(EPROTO, "ext types are refused") from None
        code = E2BIG if "exceeds max" in str(e) else EPROTO
        raise WireError(code, f"undecodable message: {e}") from None
    except Exception as e:      # belt and braces: a decoder surprise is still the peer's fault
        raise WireError(EPROTO, f"undecodable message: {type(e).__name__}: {e}") from None


def pack(obj: Any) -> bytes:
    """Encode obj. Raises TypeError if it holds something msgpack cannot carry."""
    return msgpack.packb(obj, use_bin_type=True)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_header(msg) -> int:
    """Check version and id of a decoded header; returns the id. Raises WireError EPROTO."""
    if not isinstance(msg, dict):
        raise WireError(EPROTO, f"header must be a map, got {type(msg).__name__}")
    cid = msg.get("id")
    cid = cid if _is_int(cid) and 0 <= cid <= MAX_ID else None
    if "v" not in msg:
        raise WireError(EPROTO, "header has no version 'v'", cid)
    if msg["v"] != VERSION or not _is_int(msg["v"]):
        raise WireError(EPROTO, f"unsupported wire version {msg['v']!r}, this kernel speaks {VERSION}", cid)
    if cid is None:
        raise WireError(EPROTO, f"'id' must be an int in [0, 2**63), got {msg.get('id')!r}")
    return cid


def decode_request(frames: list, max_message: int = MAX_MESSAGE) -> WireRequest:
    """Decode a request's frames (header first). Raises WireError; .call_id is set when known."""
    if not frames:
        raise WireError(EPROTO, "empty message")
    msg = unpack(frames[0], max_message)
    cid = _check_header(msg)
    nr, args = msg.get("nr"), msg.get("a", {})
    if not _is_int(nr):
        raise WireError(EPROTO, f"'nr' must be an int, got {type(nr).__name__}", cid)
    if not isinstance(args, dict):
        raise WireError(EPROTO, f"'a' must be a map, got {type(args).__name__}", cid)
    extra = set(msg) - {"v", "id", "nr", "a"}
    if extra:
        raise WireError(EPROTO, f"unknown header field {sorted(map(str, extra))[0]!r}", cid)
    rest = tuple(frames[1:])
    if sum(len(f) for f in rest) > max_message:
        raise WireError(E2BIG, f"binary frames exceed {max_message} bytes", cid)
    return WireRequest(cid, nr, args, rest)


def encode_request(cid: int, nr: int, args: dict) -> bytes:
    return pack({"v": VERSION, "id": cid, "nr": int(nr), "a": args})


def encode_reply(cid, result) -> bytes:
    return pack({"v": VERSION, "id": cid, "ok": True, "r": result})


def encode_error(cid, code: str, msg: str) -> bytes:
    return pack({"v": VERSION, "id": cid, "ok": False, "e": {"code": code, "msg": msg}})


def encode_event(cid, payload, ev: str = "delta") -> bytes:
    return pack({"v": VERSION, "id": cid, "ev": ev, "r": payload})


def decode_reply(frame: bytes, max_message: int = MAX_MESSAGE) -> Reply:
    """Decode a reply, error or event (client side). Raises WireError EPROTO if malformed."""
    msg = unpack(frame, max_message)
    if not isinstance(msg, dict) or msg.get("v") != VERSION:
        raise WireError(EPROTO, "reply is not a v1 map")
    cid = msg.get("id")
    if "ev" in msg:
        return Reply(cid, "event", msg.get("r"))
    if msg.get("ok") is True:
        return Reply(cid, "ok", msg.get("r"))
    e = msg.get("e")
    if msg.get("ok") is False and isinstance(e, dict):
        return Reply(cid, "error", (str(e.get("code")), str(e.get("msg", ""))))
    raise WireError(EPROTO, "reply has neither a result nor an error")


class Coalesced:
    """Coalesces the delta payloads of one call in time linear in their total size: str and
    list values concatenate, any other value (or a change of type) takes the newest value."""
    __slots__ = ("parts",)

    def __init__(self, payload: dict | None = None):
        self.parts: dict = {}
        if payload:
            self.add(payload)

    def add(self, payload: dict) -> None:
        for k, v in payload.items():
            cur = self.parts.get(k)
            if isinstance(v, str) and cur is not None and cur[0] == "s":
                cur[1].append(v)
            elif isinstance(v, list) and cur is not None and cur[0] == "l":
                cur[1].extend(v)
            elif isinstance(v, str):
                self.parts[k] = ("s", [v])
            elif isinstance(v, list):
                self.parts[k] = ("l", list(v))
            else:
                self.parts[k] = ("v", v)

    def payload(self) -> dict:
        return {k: "".join(p) if t == "s" else p for k, (t, p) in self.parts.items()}


def merge_delta(*payloads: dict) -> dict:
    """The coalesced payload of several deltas of one call (see Coalesced). Returns a new dict."""
    d = Coalesced()
    for p in payloads:
        d.add(p)
    return d.payload()
