"""`llmos serve` as a real subprocess on a real kernel (tiny), driven by the official
`openai` client and plain HTTP: answers equal the SDK's, errors come in OpenAI's shape
with the right status, API keys are processes, a client gone mid-stream frees its KV."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time

import openai
import pytest

from llmos.syscalls.types import ProcState
from llmos.userland import connect
from tests.kernels import ROOT
from tests.userland.test_cli_kernel import T
from tests.userland.test_commands import eventually

CHAT = [{"role": "user", "content": "add 12 47"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """`llmos serve` on a free port for the kernel of home; stopped by close()."""

    def __init__(self, home, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
        for _ in range(3):      # the free port may be taken (the other worker) before it binds
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llmos.userland.cli", "serve", "--home", str(home),
                 "--port", str(self.port), *args], cwd=ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            self.url = f"http://127.0.0.1:{self.port}"
            eventually(lambda: self.proc.poll() is not None or self._up(), "the gateway answers")
            if self.proc.poll() is None:
                return
            said = self.proc.stdout.read()
            if "address already in use" not in said.lower():
                break
        raise AssertionError(f"llmos serve exited: {said}")

    def _up(self) -> bool:
        try:
            return self.get("/health")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, body=None, headers=None):
        """(status, decoded JSON or text) of one plain HTTP request."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=T)
        try:
            data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
            c.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
            r = c.getresponse()
            text = r.read().decode()
        finally:
            c.close()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text

    def get(self, path):
        return self.request("GET", path)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=T)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(T)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(T)


@pytest.fixture(scope="module")
def gateway(kernel_home):
    g = Gateway(kernel_home)
    yield g
    g.close()


@pytest.fixture
def owner(kernel_home):
    with connect(kernel_home, timeout=T) as k:
        yield k


def api_pid(k, name="api") -> int:
    return eventually(lambda: next((p.pid for p in k.ps() if p.name == name
                                    and p.state is not ProcState.ZOMBIE), None),
                      f"the gateway's process {name}")


def test_chat_and_completions_equal_the_sdk_streamed_or_not(gateway, owner):
    client = gateway.client()
    sdk = owner.generate(messages=CHAT, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.content == sdk.text and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == "stop" and chat.object == "chat.completion"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        sdk.usage.prompt_tokens, sdk.usage.completion_tokens)
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sdk.text
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == sdk.usage.completion_tokens

    text = owner.generate("12+47=", max_tokens=6, temperature=0, stop=["\n"])
    done = client.completions.create(model="tiny", prompt="12+47=", max_tokens=6, stop="\n",
                                     temperature=0)
    assert done.choices[0].text == text.text and done.usage.total_tokens == (
        text.usage.prompt_tokens + text.usage.completion_tokens)
    ids = owner.tokenize("12+47=")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, stop="\n")
    assert by_ids.choices[0].text == text.text
    streamed = client.completions.create(model="tiny", prompt="12+47=", max_tokens=6,
                                         stop="\n", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.text


def test_models_health_and_unknown_routes(gateway):
    status, models = gateway.get("/v1/models")
    assert status == 200 and models["object"] == "list"
    assert {"id": "tiny", "state": "ready"}.items() <= models["data"][0].items()
    assert [m.id for m in gateway.client().models.list()] == [m["id"] for m in models["data"]]
    assert gateway.get("/health") == (200, {"status": "ok"})
    status, body = gateway.get("/v1/nothing")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_bad_arguments_are_400_with_the_kernels_message_and_unknown_models_404(gateway):
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=100000)
    assert "exceeds the model's context length 512" in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, temperature=-1)
    assert "temperature" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nosuch", messages=CHAT)
    assert e.value.body["code"] == "model_not_found" and "tiny" in e.value.message
    status, body = gateway.request("POST", "/v1/chat/completions", "{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = gateway.request("POST", "/v1/completions", {"model": "tiny", "prompt": [[1], [2]]})
    assert status == 400 and body["error"]["param"] == "prompt"


def test_a_limit_hit_is_429(gateway, owner):
    client = gateway.client()
    client.completions.create(model="tiny", prompt="1+1=", max_tokens=1)
    pid = api_pid(owner)
    owner.setrlimit(pid, calls=0)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="1+1=", max_tokens=1)
        assert e.value.body["code"] == "EAGAIN" and "calls" in e.value.message
    finally:
        owner.setrlimit(pid, calls=512)


def test_a_client_gone_mid_stream_frees_its_request_and_kv(gateway, owner):
    client = gateway.client()
    client.completions.create(model="tiny", prompt="1+1=", max_tokens=1)
    pid = api_pid(owner)
    owner.setrlimit(pid, tokens_per_s=20)                  # slow enough to leave midway
    try:
        stream = client.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=400, stream=True,
            extra_body={"ignore_eos": True})
        got = [next(stream), next(stream), next(stream)]
        assert got[-1].choices[0].delta.content is not None
        assert next(p.calls for p in owner.ps() if p.pid == pid) == 1
        assert owner.meminfo().procs[pid].resident > 0
        stream.close()                                      # the client goes away
        eventually(lambda: next(p.calls for p in owner.ps() if p.pid == pid) == 0,
                   "the request left the kernel")
        eventually(lambda: getattr(owner.meminfo().procs.get(pid), "resident", 0) == 0,
                   "its KV freed")
        assert next(p.tokens_out for p in owner.ps() if p.pid == pid) < 300
    finally:
        owner.setrlimit(pid, tokens_per_s="unlimited")


def test_each_api_key_is_a_process_and_a_bad_key_is_401(kernel_home, owner, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# name key\nbob s3cret-bob\n")
    g = Gateway(kernel_home, "--api-key", "s3cret-one", "--api-keys", str(keys))
    try:
        for key in ("s3cret-one", "s3cret-bob"):
            g.client(key).completions.create(model="tiny", prompt="1+1=", max_tokens=1)
        names = {p.name for p in owner.ps()}
        assert {"api:key1", "api:bob"} <= names
        with pytest.raises(openai.AuthenticationError) as e:
            g.client("wrong").completions.create(model="tiny", prompt="1+1=", max_tokens=1)
        assert e.value.body["code"] == "invalid_api_key"
        assert g.request("GET", "/v1/models")[0] == 401       # every route but /health
        assert g.request("GET", "/metrics")[0] == 401
        assert g.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret-bob"})[0] == 200
        assert g.request("GET", "/health")[0] == 200
    finally:
        g.close()


def test_keys_are_read_as_written_and_the_scheme_is_bearer(kernel_home, owner, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("alice s3cr#et-alice\n  # a comment\n")
    g = Gateway(kernel_home, "--api-keys", str(keys))
    try:
        def status(auth):
            return g.request("GET", "/v1/models", headers={"Authorization": auth})[0]
        assert status("Bearer s3cr#et-alice") == 200 and status("bearer s3cr#et-alice") == 200
        assert status("Bearer s3cr") == 401 and status("s3cr#et-alice") == 401
    finally:
        g.close()
    for bad in (["--api-key", ""], ["--api-key", "a", "--api-key", "a"]):
        run = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "serve", "--home",
                              str(kernel_home), "--port", str(free_port()), *bad],
                             cwd=ROOT, capture_output=True, text=True, timeout=T)
        assert run.returncode != 0 and ("empty API key" in run.stderr
                                        or "given twice" in run.stderr), run.stderr


def test_a_client_gone_before_its_first_token_is_cancelled(gateway, owner):
    client = gateway.client()
    client.completions.create(model="tiny", prompt="1+1=", max_tokens=1)
    pid = api_pid(owner)
    before = next(p.tokens_out for p in owner.ps() if p.pid == pid)
    owner.kill(pid, "STOP")                      # its requests wait: no first token
    try:
        c = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=T)
        c.request("POST", "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": "12+47=", "max_tokens": 50, "stream": True}),
            {"Content-Type": "application/json"})
        eventually(lambda: next(p.calls for p in owner.ps() if p.pid == pid) == 1, "queued")
        c.close()                                # gone before any token
        eventually(lambda: next(p.calls for p in owner.ps() if p.pid == pid) == 0,
                   "the request cancelled while its process is stopped")
    finally:
        owner.kill(pid, "CONT")
    assert next(p.tokens_out for p in owner.ps() if p.pid == pid) == before


def test_odd_arguments_are_400_not_500(gateway):
    for body, param in (({"model": "tiny", "prompt": "x", "stop": 5}, "stop"),
                        ({"model": "tiny", "messages": CHAT, "tools": [], "tool_choice": "required"},
                         "tool_choice")):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        status, answer = gateway.request("POST", path, body)
        assert status == 400 and answer["error"]["param"] == param, answer


def test_a_restarted_kernel_is_picked_up_by_every_route(own_kernel):
    from tests.kernels import start_kernel, stop_kernel
    home, proc = own_kernel
    g = Gateway(home)
    try:
        assert g.get("/metrics")[0] == 200
        g.client().completions.create(model="tiny", prompt="1+1=", max_tokens=1)
        stop_kernel(proc)
        assert g.get("/metrics")[0] == 503 and g.get("/health")[0] == 503
        again = start_kernel(home)
        try:
            # api's connection was idle meanwhile: zmq took it to the new kernel, which
            # does not know it; the gateway finds out and connects again, unseen
            g.client().completions.create(model="tiny", prompt="1+1=", max_tokens=1)
            assert g.get("/metrics")[0] == 200 and g.get("/health")[0] == 200
        finally:
            stop_kernel(again)
    finally:
        g.close()


def test_serve_refuses_a_public_address_without_keys(kernel_home):
    run = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "serve", "--home",
                          str(kernel_home), "--host", "0.0.0.0", "--port", str(free_port())],
                         cwd=ROOT, capture_output=True, text=True, timeout=T)
    assert run.returncode != 0 and "not loopback" in run.stderr


# ---- tool calls ----------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
PAYLOAD = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
# A Hermes-style template, as Qwen's and Hermes' teach tool calls.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools: {{ tools | tojson }}\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{%- if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{%- else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tool_caller(path):
    """A random Qwen3 checkpoint made to answer any prompt with one Hermes tool call.

    Its layers add nothing (o_proj and down_proj are zero), so each next token depends on
    the current one alone; the head maps the generation prompt's last token to
    <tool_call>, that to the call's JSON (one added token), that to </tool_call>, that to
    <|im_end|>. Everything else (tokenizer, template, loading) is as for any checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import AddedToken, Tokenizer

    from tests.checkpoints import IM_END, make_checkpoint
    path = make_checkpoint("qwen3", path, num_hidden_layers=1)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, normalized=False) for t in ("<tool_call>", "</tool_call>", PAYLOAD)])
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    vocab = tok.get_vocab_size()
    weights = load_file(str(path / "model.safetensors"))
    torch.manual_seed(1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = weights[name]
        weights[name] = torch.cat([old, torch.randn(vocab - old.shape[0], old.shape[1])])
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = torch.zeros_like(weights[name])
        elif name == "model.norm.weight":
            weights[name] = torch.ones_like(weights[name])
    emb = weights["model.embed_tokens.weight"]
    unit = emb / emb.pow(2).mean(-1, keepdim=True).add(config["rms_norm_eps"]).sqrt()
    start = tok.encode("<|im_start|>assistant\n").ids[-1]
    chain = [start, *(tok.token_to_id(t) for t in ("<tool_call>", PAYLOAD, "</tool_call>", IM_END))]
    head = torch.zeros_like(weights["lm_head.weight"])
    for src, dst in zip(chain, chain[1:]):
        head[dst] = unit[src]
    weights["lm_head.weight"] = head
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (path / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def tool_caller(kernel_home, tmp_path_factory):
    path = make_tool_caller(tmp_path_factory.mktemp("caller") / "caller")
    with connect(kernel_home, timeout=T) as k:
        k.model_add("caller", str(path))
        yield "caller"
        eventually(lambda: _unloaded(k, "caller"), "the tool caller unloaded")
        k.model_rm("caller")


def _unloaded(k, name) -> bool:
    from llmos.syscalls import SyscallError
    try:
        k.model_unload(name)
        return True
    except SyscallError as e:
        return e.code == "EINVAL" and "not loaded" in e.msg


def test_a_hermes_tool_call_comes_back_as_tool_calls(gateway, tool_caller):
    client = gateway.client()
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=tool_caller, messages=ask, tools=TOOLS,
                                       max_tokens=16)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model=tool_caller, messages=ask, tools=TOOLS,
                                                 max_tokens=16, stream=True))
    calls = [c for ch in chunks if ch.choices for c in (ch.choices[0].delta.tool_calls or [])]
    assert [c.function.name for c in calls] == ["get_weather"] and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call and its result go back to the model, rendered by its template
    follow = ask + [choice.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    again = client.chat.completions.create(model=tool_caller, messages=follow, tools=TOOLS,
                                           max_tokens=16)
    assert again.choices[0].finish_reason == "tool_calls"
    # without tools, the same words are plain text
    plain = client.chat.completions.create(model=tool_caller, messages=ask, max_tokens=16,
                                           tools=TOOLS, tool_choice="none")
    assert plain.choices[0].message.content == f"<tool_call>{PAYLOAD}</tool_call>"
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls


# ---- metrics -------------------------------------------------------------------------------

def scrape(gateway) -> dict:
    """{(sample name, labels...): value} of one GET /metrics, parsed by prometheus-client."""
    from prometheus_client.parser import text_string_to_metric_families
    status, text = gateway.get("/metrics")
    assert status == 200, text
    return {(s.name, *sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_exactly_what_was_sent(gateway, owner):
    client = gateway.client()
    client.completions.create(model="tiny", prompt="1+1=", max_tokens=1)
    pid = api_pid(owner)
    api = f"{pid}:api"
    before = scrape(gateway)
    for _ in range(3):
        client.completions.create(model="tiny", prompt="12+47=", max_tokens=5,
                                  extra_body={"ignore_eos": True})
    after = scrape(gateway)

    def grew(name, **labels):
        key = (name, *sorted(labels.items()))
        return after.get(key, 0) - before.get(key, 0)
    tiny = {"model": "tiny"}
    assert grew("llmos_requests_total", finish_reason="length", **tiny) == 3
    assert grew("llmos_generated_tokens_total", **tiny) == 15
    for h in ("llmos_time_to_first_token_seconds", "llmos_time_per_output_token_seconds",
              "llmos_e2e_request_latency_seconds"):
        assert grew(f"{h}_count", **tiny) == 3
        assert grew(f"{h}_bucket", le="+Inf", **tiny) == 3
    assert grew("llmos_process_tokens", process=api, direction="out") == 15
    assert grew("llmos_process_requests", process=api) == 3
    assert grew("llmos_http_requests_total", path="/v1/completions", status="200") == 3
    kv = owner.meminfo().models["tiny"].kv
    assert after[("llmos_kv_blocks", ("model", "tiny"), ("state", "total"))] == kv.total
    assert after[("llmos_requests_running", ("model", "tiny"))] == 0
