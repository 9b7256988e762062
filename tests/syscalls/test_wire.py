"""Wire format v1: round trips, bounded decoding, precise errors for every malformed header."""
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmos.syscalls import wire
from llmos.syscalls.errors import E2BIG, EPROTO, WireError


def header(**over):
    h = {"v": 1, "id": 7, "nr": 11, "a": {"prompt": "hi"}}
    h.update(over)
    return {k: v for k, v in h.items() if v is not _DROP}


_DROP = object()


def decode(obj, **kw):
    return wire.decode_request([msgpack.packb(obj, use_bin_type=True)], **kw)


def test_request_round_trip_with_binary_frames():
    frames = [wire.encode_request(3, 11, {"prompt": "héllo", "token_ids": [1, 2]}), b"\x00" * 10]
    req = wire.decode_request(frames)
    assert req == (3, 11, {"prompt": "héllo", "token_ids": [1, 2]}, (b"\x00" * 10,))


def test_reply_error_event_round_trip():
    assert wire.decode_reply(wire.encode_reply(5, {"a": [1, 2]})) == (5, "ok", {"a": [1, 2]})
    assert wire.decode_reply(wire.encode_error(5, "EINVAL", "bad")) == (5, "error", ("EINVAL", "bad"))
    assert wire.decode_reply(wire.encode_event(5, {"text": "x"})) == (5, "event", {"text": "x"})
    assert msgpack.unpackb(wire.encode_event(5, {})) == {"v": 1, "id": 5, "ev": "delta", "r": {}}


@pytest.mark.parametrize("obj, fragment, has_id", [
    ([1, 2], "header must be a map", False),
    ("str", "header must be a map", False),
    (header(v=2), "unsupported wire version 2", True),
    (header(v="1"), "unsupported wire version", True),
    (header(v=True), "unsupported wire version", True),
    (header(v=_DROP), "no version", True),
    (header(id=-1), "'id' must be an int", False),
    (header(id="7"), "'id' must be an int", False),
    (header(id=True), "'id' must be an int", False),
    (header(id=1.0), "'id' must be an int", False),
    (header(id=_DROP), "'id' must be an int", False),
    (header(nr="generate"), "'nr' must be an int", True),
    (header(nr=_DROP), "'nr' must be an int", True),
    (header(nr=None), "'nr' must be an int", True),
    (header(a=[1]), "'a' must be a map", True),
    (header(a="x"), "'a' must be a map", True),
    (header(extra=1), "unknown header field 'extra'", True),
])
def test_bad_header_is_eproto_with_id_when_known(obj, fragment, has_id):
    with pytest.raises(WireError) as e:
        decode(obj)
    assert e.value.code == EPROTO and fragment in e.value.msg
    assert e.value.call_id == (7 if has_id else None)


@pytest.mark.parametrize("frame", [
    b"", b"\xc1", b"\x92\x01", msgpack.packb({1: 2}), msgpack.packb({"v": 1}) + b"\x00",
    msgpack.packb(msgpack.ExtType(5, b"x")), msgpack.packb(msgpack.Timestamp(1, 0)),
    msgpack.packb({"v": 1, "id": 1, "nr": 0, "a": {"x": msgpack.ExtType(1, b"")}}),
    b"\x81\xa1a" + b"\xdc\xff\xff" * 1, b"\xff" * 3, b"\x91" * 5000 + b"\x00",
    msgpack.packb({"v": 1, "id": 1, "nr": 0, "a": {"s": b"\xff\xfe".decode("latin1")}})[:-1],
    b"\xa2\xff\xfe",    # invalid utf-8 in a str
])
def test_undecodable_is_eproto(frame):
    with pytest.raises(WireError) as e:
        wire.decode_request([frame])
    assert e.value.code == EPROTO and e.value.call_id is None


def test_empty_message_is_eproto():
    with pytest.raises(WireError) as e:
        wire.decode_request([])
    assert e.value.code == EPROTO


def test_pickle_bytes_are_never_unpickled():
    import pickle
    with pytest.raises(WireError) as e:
        wire.decode_request([pickle.dumps({"v": 1})])
    assert e.value.code == EPROTO


def test_size_limits_are_e2big():
    big = wire.encode_request(1, 17, {"text": "x" * 2000})
    with pytest.raises(WireError) as e:
        wire.decode_request([big], max_message=1000)
    assert e.value.code == E2BIG and "exceeds 1000" in e.value.msg
    many = msgpack.packb({"v": 1, "id": 1, "nr": 0, "a": {"t": [0] * (wire.MAX_ARRAY + 1)}})
    with pytest.raises(WireError) as e:
        wire.decode_request([many], max_message=len(many))
    assert e.value.code == E2BIG and "max_array_len" in e.value.msg
    with pytest.raises(WireError) as e:
        wire.decode_request([wire.encode_request(1, 0, {}), b"x" * 2000], max_message=1000)
    assert e.value.code == E2BIG and e.value.call_id == 1


def test_a_frame_of_empty_maps_is_refused_before_it_grows_in_memory():
    # Finding 5 of the protection issue: a 14 MB frame of empty maps decoded into 14 M dicts
    # (+991 MiB). One wire byte each, ~64 bytes each in memory: the decoder stops counting
    # at MAX_CONTAINERS maps and arrays, wherever they nest.
    flat = wire.encode_request(1, 1, {"x": [[{}] * (1 << 20)] * 14})
    assert len(flat) > 14 << 20
    with pytest.raises(WireError) as e:
        wire.decode_request([flat])
    assert e.value.code == E2BIG and "maps and arrays" in str(e.value)
    fine = wire.encode_request(2, 1, {"messages": [{"role": "user", "content": "hi"}] * 1000,
                                      "token_ids": list(range(1 << 20))})
    assert len(wire.decode_request([fine]).args["token_ids"]) == 1 << 20


def test_merge_delta_concatenates_text_and_lists():
    a = {"text": "ab", "token_ids": [1], "finish": None}
    b = {"text": "c", "token_ids": [2, 3], "finish": "stop", "n": 2}
    assert wire.merge_delta(a, b) == {"text": "abc", "token_ids": [1, 2, 3], "finish": "stop", "n": 2}
    assert a["text"] == "ab"


plain = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
                     | st.text(max_size=20) | st.binary(max_size=20),
                     lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids, max_size=5),
                     max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(cid=st.integers(0, wire.MAX_ID), nr=st.integers(-2**63, 2**63 - 1),
       args=st.dictionaries(st.text(max_size=8), plain, max_size=6))
def test_request_round_trip_property(cid, nr, args):
    assert wire.decode_request([wire.encode_request(cid, nr, args)]) == (cid, nr, args, ())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_wireerror(blob):
    try:
        wire.decode_request([blob])
    except WireError as e:
        assert e.code in (EPROTO, E2BIG)
