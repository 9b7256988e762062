"""Argument specs: every syscall's spec accepts its good arguments and names the bad one."""
import json
import math

import pytest

from llmos.syscalls.args import Bool, Bytes, Dict, Float, Int, List, Signal, Spec, Str
from llmos.syscalls.chat import Json, Messages
from llmos.syscalls.errors import E2BIG, EINVAL, SyscallError
from llmos.syscalls.numbers import Sys
from llmos.syscalls.specs import LIMITS, SPECS, parse_limit
from llmos.syscalls.types import Limits

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
# An OpenAI tool conversation: the assistant's calls (no content), then the tool's reply.
TOOL_MSGS = MSGS + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
                     "content": "sunny"},
                    {"role": "assistant", "tool_calls": [CALL, {**CALL, "id": "call_2"}]},
                    {"role": "assistant", "content": "and", "tool_calls": []},
                    {"role": "tool", "content": "no id"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer", "minimum": 1}},
                   "required": ["city"], "additionalProperties": False}}}]

GOOD = {
    Sys.PING: [{}],
    Sys.HELLO: [{"token": "abc"}],
    Sys.SYSCALLS: [{}], Sys.SYSINFO: [{}], Sys.PS: [{}], Sys.GETPID: [{}],
    Sys.MEMINFO: [{}], Sys.MODELS: [{}],
    Sys.SPAWN: [{"argv": ["python", "-c", "pass"]},
                {"argv": ["a"], "name": "agent", "nice": -20, "env": {"K": "v"}},
                {"argv": ["a"], "limits": {}},
                {"argv": ["a"], "limits": {"calls": 0, "children": "unlimited",
                                           "tokens_per_s": 2.5}}],
    Sys.EXIT: [{"status": 0}, {"status": -1}],
    Sys.WAIT: [{"pid": 3}, {"pid": 3, "timeout": 1.5}, {"pid": 3, "timeout": 2}],
    Sys.KILL: [{"pid": 3}, {"pid": 3, "sig": "KILL"}, {"pid": 3, "sig": "SIGSTOP"}, {"pid": 3, "sig": 18}],
    Sys.NICE: [{"value": 5}, {"pid": 2, "value": 19}],
    Sys.GENERATE: [{"prompt": "hi"}, {"messages": MSGS}, {"token_ids": [1, 2, 3]},
                   {"prompt": "x", "max_tokens": 16, "temperature": 0.7, "top_k": 40, "top_p": 1,
                    "min_p": 0.05, "seed": -5, "stop": ["\n"], "stop_token_ids": [2],
                    "ignore_eos": True, "context": 4, "stream": True, "model": "tiny"},
                   {"messages": TOOL_MSGS, "tools": TOOLS}, {"messages": MSGS, "tools": []},
                   {"messages": MSGS, "tools": [{"type": "function", "function": {
                       "name": "f", "parameters": {"a": [1, 2.5, None, True, {"b": "c"}]}}}] * 128}],
    Sys.CANCEL: [{"call": 12}],
    Sys.CONTEXT_CREATE: [{}, {"system": "You are terse."}, {"messages": MSGS},
                         {"system": "You are terse.", "tools": TOOLS}],
    Sys.CONTEXT_FORK: [{"context": 1}], Sys.CONTEXT_FREE: [{"context": 1}],
    Sys.CONTEXT_INFO: [{"context": 1}],
    Sys.TOKENIZE: [{"text": "hello"}, {"text": ""}],
    Sys.DETOKENIZE: [{"token_ids": [1, 2]}, {"token_ids": []}],
    Sys.SCHED: [{}, {"policy": "fair"}],
    Sys.SETRLIMIT: [{}, {"calls": 4}, {"pid": 3, "kv_blocks": 0, "contexts": "unlimited",
                                       "children": 2, "tokens_per_s": 10}],
    Sys.GETRLIMIT: [{}, {"pid": 3}],
    Sys.MODEL_LOAD: [{"name": "tiny"}, {"name": "/data/m.gguf", "keep_alive": -1},
                     {"name": "smol", "keep_alive": 300}],
    Sys.MODEL_UNLOAD: [{"name": "smol"}],
    Sys.MODEL_ADD: [{"name": "smol", "path": "/data/m.gguf"},
                    {"name": "q", "path": "/m", "dtype": "bfloat16", "quantize": "int8",
                     "keep_alive": 60}],
    Sys.MODEL_RM: [{"name": "smol"}],
    Sys.METRICS: [{}],
}

# (syscall, args, code, words the message must contain)
BAD = [
    (Sys.PING, {"x": 1}, EINVAL, "unknown argument 'x'"),
    (Sys.HELLO, {}, EINVAL, "missing argument 'token'"),
    (Sys.HELLO, {"token": 5}, EINVAL, "'token': expected str, got int"),
    (Sys.HELLO, {"token": "x" * 257}, E2BIG, "'token': too long"),
    (Sys.SPAWN, {}, EINVAL, "missing argument 'argv'"),
    (Sys.SPAWN, {"argv": []}, EINVAL, "'argv': needs at least 1"),
    (Sys.SPAWN, {"argv": "python"}, EINVAL, "'argv': expected list, got str"),
    (Sys.SPAWN, {"argv": ["a", 3]}, EINVAL, "'argv[1]': expected str, got int"),
    (Sys.SPAWN, {"argv": ["a"] * 257}, E2BIG, "'argv': too long"),
    (Sys.SPAWN, {"argv": ["a"], "nice": 20}, EINVAL, "'nice': 20 is above the maximum 19"),
    (Sys.SPAWN, {"argv": ["a"], "nice": True}, EINVAL, "'nice': expected int, got bool"),
    (Sys.SPAWN, {"argv": ["a"], "env": {"K": 1}}, EINVAL, "'env['K']': expected str"),
    (Sys.SPAWN, {"argv": ["a"], "env": ["K"]}, EINVAL, "'env': expected map"),
    (Sys.SPAWN, {"argv": ["a"], "env": {"": "v"}}, EINVAL, "'env key': too short"),
    (Sys.EXIT, {}, EINVAL, "missing argument 'status'"),
    (Sys.EXIT, {"status": 1.0}, EINVAL, "'status': expected int, got float"),
    (Sys.WAIT, {"pid": -1}, EINVAL, "'pid': -1 is below the minimum 0"),
    (Sys.WAIT, {"pid": 1, "timeout": math.nan}, EINVAL, "'timeout': expected a finite float"),
    (Sys.WAIT, {"pid": 1, "timeout": math.inf}, EINVAL, "'timeout': expected a finite float"),
    (Sys.WAIT, {"pid": 1, "timeout": -1.0}, EINVAL, "'timeout': -1.0 must be >= 0"),
    (Sys.WAIT, {"pid": 1, "timeout": "1"}, EINVAL, "'timeout': expected float, got str"),
    (Sys.KILL, {"pid": 1, "sig": "HUP"}, EINVAL, "'sig': 'HUP' is not one of TERM, KILL"),
    (Sys.KILL, {"pid": 1, "sig": 1}, EINVAL, "'sig': 1 is not one of"),
    (Sys.KILL, {"pid": 1, "sig": [9]}, EINVAL, "'sig': expected a signal name or number"),
    (Sys.KILL, {"pid": 1, "sig": True}, EINVAL, "'sig': expected a signal"),
    (Sys.NICE, {"pid": 1}, EINVAL, "missing argument 'value'"),
    (Sys.NICE, {"value": -21}, EINVAL, "'value': -21 is below the minimum -20"),
    (Sys.GENERATE, {}, EINVAL, "exactly one of prompt, messages, token_ids"),
    (Sys.GENERATE, {"prompt": "a", "token_ids": [1]}, EINVAL, "got 'prompt' and 'token_ids'"),
    (Sys.GENERATE, {"prompt": 3}, EINVAL, "'prompt': expected str, got int"),
    (Sys.GENERATE, {"prompt": b"x"}, EINVAL, "'prompt': expected str, got bytes"),
    (Sys.GENERATE, {"prompt": "x" * ((4 << 20) + 1)}, E2BIG, "'prompt': too long"),
    (Sys.GENERATE, {"token_ids": [1, -2]}, EINVAL, "'token_ids[1]': -2 is below the minimum 0"),
    (Sys.GENERATE, {"token_ids": [1, "2"]}, EINVAL, "'token_ids[1]': expected int, got str"),
    (Sys.GENERATE, {"token_ids": [1, True]}, EINVAL, "'token_ids[1]': expected int, got bool"),
    (Sys.GENERATE, {"token_ids": [0] * ((1 << 20) + 1)}, E2BIG, "'token_ids': too long"),
    (Sys.GENERATE, {"messages": []}, EINVAL, "'messages': needs at least one"),
    (Sys.GENERATE, {"messages": [{"role": "user"}]}, EINVAL, "'messages[0].content': missing"),
    (Sys.GENERATE, {"messages": [{"role": "god", "content": "x"}]}, EINVAL, "'messages[0].role': 'god' is not one of"),
    (Sys.GENERATE, {"messages": [{"role": "user", "content": 1}]}, EINVAL, "'messages[0].content': expected str"),
    (Sys.GENERATE, {"messages": [{"role": "user", "content": "x", "name": "n"}]}, EINVAL, "'messages[0].name': unknown"),
    (Sys.GENERATE, {"messages": ["hi"]}, EINVAL, "'messages[0]': expected a map"),
    (Sys.GENERATE, {"messages": {"role": "user"}}, EINVAL, "'messages': expected list of messages"),
    (Sys.GENERATE, {"prompt": "x", "max_tokens": -1}, EINVAL, "'max_tokens': -1 is below"),
    (Sys.GENERATE, {"prompt": "x", "max_tokens": 1 << 21}, EINVAL, "'max_tokens': 2097152 is above"),
    (Sys.GENERATE, {"prompt": "x", "temperature": -0.1}, EINVAL, "'temperature': -0.1 must be >= 0"),
    (Sys.GENERATE, {"prompt": "x", "temperature": math.nan}, EINVAL, "'temperature': expected a finite"),
    (Sys.GENERATE, {"prompt": "x", "temperature": True}, EINVAL, "'temperature': expected float, got bool"),
    (Sys.GENERATE, {"prompt": "x", "top_p": 0}, EINVAL, "'top_p': 0.0 must be > 0"),
    (Sys.GENERATE, {"prompt": "x", "top_p": 1.01}, EINVAL, "'top_p': 1.01 must be <= 1"),
    (Sys.GENERATE, {"prompt": "x", "top_k": -1}, EINVAL, "'top_k'"),
    (Sys.GENERATE, {"prompt": "x", "min_p": 2}, EINVAL, "'min_p'"),
    (Sys.GENERATE, {"prompt": "x", "seed": 1 << 63}, EINVAL, "'seed'"),
    (Sys.GENERATE, {"prompt": "x", "stop": "\n"}, EINVAL, "'stop': expected list"),
    (Sys.GENERATE, {"prompt": "x", "stop": [""]}, EINVAL, "'stop[0]': too short"),
    (Sys.GENERATE, {"prompt": "x", "stop": ["a"] * 17}, E2BIG, "'stop': too long"),
    (Sys.GENERATE, {"prompt": "x", "stop_token_ids": [1.5]}, EINVAL, "'stop_token_ids[0]': expected int"),
    (Sys.GENERATE, {"prompt": "x", "ignore_eos": 1}, EINVAL, "'ignore_eos': expected bool, got int"),
    (Sys.GENERATE, {"prompt": "x", "stream": "yes"}, EINVAL, "'stream': expected bool, got str"),
    (Sys.GENERATE, {"prompt": "x", "context": "c1"}, EINVAL, "'context': expected int"),
    (Sys.GENERATE, {"prompt": "x", "n": 2}, EINVAL, "unknown argument 'n'"),
    (Sys.CANCEL, {}, EINVAL, "missing argument 'call'"),
    (Sys.CANCEL, {"call": "1"}, EINVAL, "'call': expected int"),
    (Sys.CONTEXT_CREATE, {"system": "a", "messages": MSGS}, EINVAL, "at most one of system, messages"),
    (Sys.CONTEXT_CREATE, {"system": 1}, EINVAL, "'system': expected str"),
    (Sys.CONTEXT_FORK, {}, EINVAL, "missing argument 'context'"),
    (Sys.CONTEXT_FREE, {"context": -1}, EINVAL, "'context': -1 is below"),
    (Sys.CONTEXT_INFO, {"context": None}, EINVAL, "missing argument 'context'"),
    (Sys.TOKENIZE, {"text": None}, EINVAL, "missing argument 'text'"),
    (Sys.TOKENIZE, {"text": ["a"]}, EINVAL, "'text': expected str, got list"),
    (Sys.DETOKENIZE, {"token_ids": [1 << 40]}, EINVAL, "'token_ids[0]'"),
    (Sys.DETOKENIZE, {"token_ids": {"0": 1}}, EINVAL, "'token_ids': expected list, got dict"),
    (Sys.MODELS, {"all": True}, EINVAL, "unknown argument 'all'"),
    (Sys.SPAWN, {"argv": ["a"], "limits": [3]}, EINVAL, "'limits': expected map, got list"),
    (Sys.SPAWN, {"argv": ["a"], "limits": {"cpu": 1}}, EINVAL, "'limits.cpu': unknown field"),
    (Sys.SPAWN, {"argv": ["a"], "limits": {"calls": -1}}, EINVAL, "'limits.calls': -1 is below"),
    (Sys.SPAWN, {"argv": ["a"], "limits": {"calls": "none"}}, EINVAL,
     "'limits.calls': expected a number or 'unlimited', got 'none'"),
    (Sys.SCHED, {"policy": ""}, EINVAL, "'policy': too short"),
    (Sys.SCHED, {"policy": 1}, EINVAL, "'policy': expected str"),
    (Sys.SETRLIMIT, {"calls": 1.5}, EINVAL, "'calls': expected int, got float"),
    (Sys.SETRLIMIT, {"calls": True}, EINVAL, "'calls': expected int, got bool"),
    (Sys.SETRLIMIT, {"contexts": "Unlimited"}, EINVAL, "'contexts': expected a number or"),
    (Sys.SETRLIMIT, {"tokens_per_s": 0}, EINVAL, "'tokens_per_s': 0.0 must be > 0"),
    (Sys.SETRLIMIT, {"tokens_per_s": math.inf}, EINVAL, "'tokens_per_s': expected a finite"),
    (Sys.SETRLIMIT, {"nice": 3}, EINVAL, "unknown argument 'nice'"),
    (Sys.GETRLIMIT, {"pid": -1}, EINVAL, "'pid': -1 is below"),
    (Sys.MODEL_LOAD, {}, EINVAL, "missing argument 'name'"),
    (Sys.MODEL_LOAD, {"name": ""}, EINVAL, "'name': too short"),
    (Sys.MODEL_LOAD, {"name": "m", "keep_alive": "5m"}, EINVAL, "'keep_alive': expected float"),
    (Sys.MODEL_LOAD, {"name": "m", "keep_alive": -2}, EINVAL, "'keep_alive': -2.0 must be >= -1"),
    (Sys.MODEL_UNLOAD, {"name": "x" * 5000}, E2BIG, "'name': too long"),
    (Sys.MODEL_ADD, {"name": "m"}, EINVAL, "missing argument 'path'"),
    (Sys.MODEL_ADD, {"name": "m", "path": "/m", "dtype": "int4"}, EINVAL,
     "'dtype': 'int4' is not one of auto, float32, bfloat16, float16"),
    (Sys.MODEL_ADD, {"name": "m", "path": "/m", "quantize": "q4"}, EINVAL,
     "'quantize': 'q4' is not one of int8"),
    (Sys.MODEL_RM, {"name": 3}, EINVAL, "'name': expected str"),
    (Sys.METRICS, {"model": "tiny"}, EINVAL, "unknown argument 'model'"),
    # OpenAI tool conversations: the calls of an assistant message, the id of a tool reply.
    (Sys.GENERATE, {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
     EINVAL, "'messages[0].tool_calls': unknown field of a user message (only of assistant"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "content": "x", "tool_call_id": "c"}]},
     EINVAL, "'messages[0].tool_call_id': unknown field of a assistant message"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "content": None}]}, EINVAL,
     "'messages[0].content': expected str, got nil"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": []}]}, EINVAL,
     "'messages[0].content': missing"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": CALL}]}, EINVAL,
     "'messages[0].tool_calls': expected list, got dict"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": [{**CALL, "index": 0}]}]},
     EINVAL, "'messages[0].tool_calls[0].index': unknown field (one of id, type, function)"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
     EINVAL, "'messages[0].tool_calls[0].id': missing"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}]},
     EINVAL, "'messages[0].tool_calls[0].type': 'code' is not one of function"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "f", "arguments": {"city": "Paris"}}}]}]},
     EINVAL, "'messages[0].tool_calls[0].function.arguments': expected str, got dict"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": [
        {**CALL, "function": {"arguments": "{}"}}]}]},
     EINVAL, "'messages[0].tool_calls[0].function.name': missing"),
    (Sys.GENERATE, {"messages": [{"role": "assistant", "tool_calls": [CALL] * 129}]}, E2BIG,
     "'messages[0].tool_calls': too long"),
    (Sys.GENERATE, {"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]}, EINVAL,
     "'messages[0].tool_call_id': expected str, got int"),
    (Sys.GENERATE, {"messages": [{"role": "tool", "content": "x", "id": "c"}]}, EINVAL,
     "'messages[0].id': unknown message field"),
    (Sys.GENERATE, {"messages": MSGS, "tools": {"type": "function"}}, EINVAL,
     "'tools': expected list of maps, got dict"),
    (Sys.GENERATE, {"messages": MSGS, "tools": ["get_weather"]}, EINVAL,
     "'tools[0]': expected a map, got str"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{}] * 129}, E2BIG, "'tools': too long"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"f": {"x": b"\0"}}]}, EINVAL,
     "'tools[0]['f']['x']': expected JSON data"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"f": [math.nan]}]}, EINVAL,
     "'tools[0]['f'][0]': expected a finite float"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"f": {b"k": "x"}}]}, EINVAL,
     "'tools[0]['f'] key': expected str, got bytes"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"a": {"a": {"a": {"a": {"a": {"a": {"a": {
        "a": {"a": {"a": {"a": {"a": {"a": {"a": {"a": {"a": {}}}}}}}}}}}}}}}}}]}, EINVAL,
     "'tools[0]" + "['a']" * 15 + "': nested deeper than 16 maps and lists"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"d": "x" * (256 << 10)}]}, E2BIG,
     "'tools': too large"),
    (Sys.CONTEXT_CREATE, {"tools": TOOLS, "model": 1}, EINVAL, "'model': expected str"),
    # tools as templates read them: a template given another shape fails inside itself
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"type": "function", "function": {"name": 5}}]},
     EINVAL, "'tools[0].function.name': expected a non-empty str"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"type": "code", "function": {"name": "f"}}]},
     EINVAL, "'tools[0].type': expected \"function\""),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"function": {"name": "f", "parameters": []}}]},
     EINVAL, "'tools[0].function.parameters': expected a map"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"function": {"name": "f"}, "x": 1}]},
     EINVAL, "'tools[0].x': unknown field"),
    (Sys.GENERATE, {"messages": MSGS, "tools": [{"type": "function"}]},
     EINVAL, "'tools[0].function': missing"),
]


def test_every_syscall_has_a_spec_and_good_examples():
    assert set(SPECS) == set(Sys) == set(GOOD)


@pytest.mark.parametrize("nr, args", [(nr, a) for nr, examples in GOOD.items() for a in examples])
def test_good_arguments_pass_with_defaults_filled(nr, args):
    out = SPECS[nr].validate(args)
    assert set(out) == set(SPECS[nr].fields)
    for k, v in args.items():
        assert out[k] == v or nr == Sys.KILL


@pytest.mark.parametrize("nr, args, code, words", BAD, ids=[f"{n.name}-{w[:30]}" for n, _, _, w in BAD])
def test_bad_arguments_are_named(nr, args, code, words):
    with pytest.raises(SyscallError) as e:
        SPECS[nr].validate(args)
    assert e.value.code == code
    assert words in e.value.msg


def test_defaults_and_normalization():
    assert SPECS[Sys.KILL].validate({"pid": 1})["sig"] == "TERM"
    assert SPECS[Sys.KILL].validate({"pid": 1, "sig": 9})["sig"] == "KILL"
    assert SPECS[Sys.KILL].validate({"pid": 1, "sig": "sigcont"})["sig"] == "CONT"
    assert SPECS[Sys.GENERATE].validate({"prompt": "x"})["stream"] is False
    assert SPECS[Sys.WAIT].validate({"pid": 1, "timeout": 2})["timeout"] == 2.0
    assert SPECS[Sys.GENERATE].validate({"prompt": "x", "seed": None})["seed"] is None


def test_validate_does_not_alias_caller_lists():
    ids = [1, 2]
    out = SPECS[Sys.DETOKENIZE].validate({"token_ids": ids})
    out["token_ids"].append(3)
    assert ids == [1, 2]


def test_describe_is_plain_data_for_every_spec():
    for nr, spec in SPECS.items():
        d = json.loads(json.dumps(spec.describe()))
        assert set(d["args"]) == set(spec.fields)
    g = SPECS[Sys.GENERATE].describe()
    assert g["one_of"] == [["prompt", "messages", "token_ids"]]
    assert g["args"]["top_p"] == {"type": "float", "required": False, "min": 0, "max": 1, "min_open": True}
    assert g["args"]["token_ids"]["of"]["type"] == "int"


def test_small_types_directly():
    assert Bytes(4).check("b", b"abcd") == b"abcd"
    with pytest.raises(SyscallError) as e:
        Bytes(4).check("b", b"abcde")
    assert e.value.code == E2BIG
    with pytest.raises(SyscallError):
        Bool().check("b", 0)
    assert Dict(Int()).check("d", {"a": 1}) == {"a": 1}
    assert List(Str(3)).check("l", ("ab",)) == ["ab"]
    assert Messages().describe()["roles"] == ["system", "user", "assistant", "tool"]
    assert Json().check("j", {"a": (1, 2.5, None)}) == {"a": [1, 2.5, None]}   # any JSON
    assert Json(max_depth=2).check("j", [[]]) == [[]]
    with pytest.raises(SyscallError, match="'j\\[0\\]\\[0\\]': nested deeper than 2"):
        Json(max_depth=2).check("j", [[[]]])
    with pytest.raises(SyscallError, match="'j': too large \\(8 > 7 bytes as JSON\\)"):
        Json(max_bytes=7).check("j", "abcdef")
    assert Json(objects=2).describe()["objects"] == 2
    assert Signal().describe()["choices"] == ["TERM", "KILL", "INT", "STOP", "CONT"]
    assert Float(0, 1, max_open=True).check("f", 0) == 0.0
    with pytest.raises(SyscallError, match="must be < 1"):
        Float(0, 1, max_open=True).check("f", 1)
    with pytest.raises(SyscallError, match="required"):
        Spec(one_of=[("a", "b")], a=Int(), b=Int()).validate({})
    assert Spec(x=Int(default=3)).validate({}) == {"x": 3}


def test_limits_have_one_spec_each_and_parse_from_text():
    assert tuple(LIMITS) == Limits.NAMES
    assert parse_limit("calls=5") == ("calls", 5)
    assert parse_limit("tokens_per_s=2.5") == ("tokens_per_s", 2.5)
    assert parse_limit("kv_blocks=unlimited") == ("kv_blocks", "unlimited")
    for text, words in (("calls", "expected NAME=VALUE"), ("cpu=1", "NAME one of calls"),
                        ("calls=1.5", "neither a number nor 'unlimited'"),
                        ("calls=-1", "'calls': -1 is below the minimum 0"),
                        ("tokens_per_s=nan", "expected a finite float")):
        with pytest.raises(SyscallError) as e:
            parse_limit(text)
        assert e.value.code == EINVAL and words in e.value.msg, e.value
