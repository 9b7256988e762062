"""OpenAI tools through the kernel's chat templating: `tools` and tool-call messages reach
the template as transformers gives them (our rendering equals transformers'), in a
generate, a context's first messages and a turn on a context; ModelInfo.tool_format.

The checkpoint is a random qwen2 (a context of 2048: its small vocabulary takes ~600
tokens for the conversation) whose template is Hermes-style, as Qwen2.5's: the tools
as JSON in the first system block, the assistant's calls as <tool_call>{...}</tool_call>,
the tools' replies as <tool_response> in a user turn.
"""
from __future__ import annotations

import copy
import json
import shutil

import pytest

from llmos.kernel import Engine
from llmos.kernel.errors import EngineError
from llmos.kernel.registry import ModelSpec
from llmos.kernel.tokenizer import Tokenizer
from llmos.syscalls import Sys
from tests.kernel.test_kernel import answer, call, conn, run, stepped_kernel

HERMES = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions.\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response'"
    " + (' id=\"' + message.tool_call_id + '\"' if message.tool_call_id is defined else '')"
    " + (' name=\"' + message.name + '\"' if message.name is defined else '')"
    " + '>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, today or later",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "You are a weather bot."}
ASK = {"role": "user", "content": "Weather in Paris?"}
# As OpenAI sends them: arguments as JSON text, an assistant's calls without content.
CALLS = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
    {"id": "call_2", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": "not json"}}]}
REPLY = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}
CONVERSATION = [SYSTEM, ASK, CALLS, REPLY]


def as_transformers(messages: list) -> list:
    """messages as transformers' docs give tool calls: arguments as maps (what our kernel,
    as vLLM, makes of OpenAI's JSON text; text that is not a JSON object becomes {})."""
    out = copy.deepcopy(messages)
    for m in out:
        for c in m.get("tool_calls", ()):
            try:
                args = json.loads(c["function"]["arguments"])
            except ValueError:
                args = {}
            c["function"]["arguments"] = args if isinstance(args, dict) else {}
    return out


@pytest.fixture(scope="module")
def hermes(checkpoint_factory):
    return checkpoint_factory("qwen2", chat_template=HERMES, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def theirs(hermes):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(hermes))


def rendered(theirs, messages, tools=TOOLS, add_generation_prompt=True) -> str:
    return theirs.apply_chat_template(as_transformers(messages), tools=tools, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)


# ---- the template, as transformers renders it ---------------------------------------------

@pytest.mark.parametrize("messages", [CONVERSATION, [ASK], [SYSTEM, ASK], [ASK, CALLS, REPLY]],
                         ids=["tool-conversation", "ask", "system", "no-system"])
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_tools_and_tool_calls_render_as_transformers_does(hermes, theirs, messages, tools):
    ours = Tokenizer.from_dir(hermes)
    for reply in (True, False):
        text = ours.apply_chat_template(messages, reply, tools=tools)
        assert text == rendered(theirs, messages, tools, reply)
    # Given the same maps (the in-process engine may), the same text.
    assert ours.apply_chat_template(as_transformers(messages), tools=tools) == \
        rendered(theirs, messages, tools)
    if tools and messages is CONVERSATION:
        assert '"arguments": {"city": "Paris", "days": 2}}' in text   # a map, not quoted text
        assert '"arguments": {}}' in text and '<tool_response id="call_1"' in text
        assert json.dumps(TOOLS[0]) in text


def test_the_in_process_engine_takes_tools_with_messages(k, theirs):
    engine = k.loop.models.slots["hermes"].engine
    req = engine.add_request(messages=CONVERSATION, tools=TOOLS, max_tokens=0)
    want = theirs(rendered(theirs, CONVERSATION), add_special_tokens=False).input_ids
    assert req.seq.tokens == want
    engine.abort(req.id)
    with pytest.raises(EngineError, match="tools: given only with messages"):
        engine.add_request([5, 6, 7], tools=TOOLS)


def test_tool_format_comes_from_the_template(hermes, checkpoints):
    assert Tokenizer.from_dir(hermes).tool_format == "hermes"
    assert Tokenizer.from_dir(checkpoints["qwen2"]).tool_format == ""


# ---- through the kernel -------------------------------------------------------------------

@pytest.fixture
def k(tmp_path, hermes):
    engine = Engine.from_pretrained(str(hermes), num_blocks=128, poison=True)
    with stepped_kernel(tmp_path, engine, "hermes", hermes) as kern:
        yield kern


def queued(k):
    """The command the last call put in the engine's inbox (taken out, then applied)."""
    k.tokenizers.run()
    c = k.loop.inbox.get(timeout=0)
    assert c is not None, "nothing queued"
    k.loop._apply[type(c)](c)
    return c


def test_a_generate_renders_its_tools_and_tool_calls(k, theirs):
    c = conn(k)
    cid = call(k, c, Sys.GENERATE, messages=CONVERSATION, tools=TOOLS, max_tokens=3)
    add = queued(k)
    assert add.tokens == theirs(rendered(theirs, CONVERSATION), add_special_tokens=False).input_ids
    run(k)
    kind, r = answer(k, c, cid)
    assert kind == "ok" and r["usage"]["prompt_tokens"] == len(add.tokens)


def test_a_context_takes_tools_first_and_tool_turns_after(k, theirs):
    c = conn(k)
    made = call(k, c, Sys.CONTEXT_CREATE, messages=[SYSTEM], tools=TOOLS)
    queued(k)
    ctx = answer(k, c, made)[1]["context"]
    turn = call(k, c, Sys.GENERATE, messages=[ASK, CALLS, REPLY], tools=TOOLS, context=ctx,
                max_tokens=0)
    queued(k)
    run(k)
    assert answer(k, c, turn)[0] == "ok"
    engine = k.loop.models.slots["hermes"].engine
    whole = rendered(theirs, CONVERSATION)       # the turn's tools render where they began
    assert engine.tokenizer.decode(engine.contexts[ctx].seq.tokens,
                                   skip_special_tokens=False) == whole


@pytest.mark.parametrize("nr, args, words", [
    (Sys.GENERATE, dict(prompt="hi", tools=TOOLS),
     "tools: given only with messages (the chat template lists them), not with a prompt"),
    (Sys.GENERATE, dict(token_ids=[5, 6], tools=TOOLS), "tools: given only with messages"),
    (Sys.CONTEXT_CREATE, dict(tools=TOOLS), "tools: given only with system or messages"),
    (Sys.GENERATE, dict(messages=[{"role": "user", "content": "x", "tool_call_id": "c"}]),
     "'messages[0].tool_call_id': unknown field of a user message (only of tool messages)"),
    (Sys.GENERATE, dict(messages=[{"role": "assistant", "tool_calls": [{"id": "c"}]}]),
     "'messages[0].tool_calls[0].function': missing"),
    (Sys.GENERATE, dict(messages=[{"role": "user", "content": "x", "name": "me"}]),
     "'messages[0].name': unknown field of a user message (only of tool messages)"),
    (Sys.GENERATE, dict(messages=[ASK, {"role": "user", "content": "x", "refusal": None}]),
     "'messages[1].refusal': unknown message field"),
    (Sys.GENERATE, dict(messages=[ASK], tools=[{"parameters": float("inf")}]),
     "'tools[0]['parameters']': expected a finite float"),
])
def test_tool_mistakes_are_einval_naming_them(k, nr, args, words):
    c = conn(k)
    kind, (code, msg) = answer(k, c, call(k, c, nr, **args))
    assert (kind, code) == ("error", "EINVAL") and words in msg, msg
    assert not k.procs.get(c.pid).requests and not k.procs.get(c.pid).contexts


def test_models_say_the_tool_format(k, checkpoints, hermes, tmp_path):
    k.loop._publish(force=True)
    k.registry.add("plain", str(checkpoints["qwen2"]))
    k.registry.add("hermes2", str(hermes))                 # add opens its directory
    rows = {m.name: m for m in k.models()}
    assert (rows["hermes"].tool_format, rows["hermes"].state) == ("hermes", "ready")
    assert (rows["hermes2"].tool_format, rows["hermes2"].state) == ("hermes", "registered")
    assert rows["plain"].tool_format == ""
    unopened = shutil.copytree(hermes, tmp_path / "unopened")   # as after a restart
    assert k._registered(ModelSpec("later", str(unopened))).tool_format == ""


def test_a_template_that_fails_inside_itself_is_einval_and_frees_the_call(k, hermes, tmp_path):
    """A template's own error (a TypeError in its code, not a jinja TemplateError) is the
    caller's EINVAL naming it; it was an EIO whose call slot was never given back."""
    broken = shutil.copytree(hermes, tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{{ 1 + messages[0].content }}")
    k.registry.add("broken", str(broken))
    c = conn(k)
    cid = call(k, c, Sys.GENERATE, messages=[ASK], model="broken", max_tokens=1)
    k.tokenizers.run()
    kind, (code, msg) = answer(k, c, cid)
    assert (kind, code) == ("error", "EINVAL") and "chat template: TypeError" in msg, msg
    assert not k.procs.get(c.pid).requests
