"""The `llmos` command, run as a real subprocess."""
import os
import subprocess
import sys

import pytest

from llmos.kernel import Engine

TIMEOUT = 120


def llmos(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_generate_streams_the_engine_output(checkpoints):
    path = str(checkpoints["llama"])
    run = llmos("generate", "--model", path, "-n", "12", "--ignore-eos", "Hello world")
    assert run.returncode == 0, run.stderr
    want = Engine.from_pretrained(path).generate(["Hello world"], max_tokens=12,
                                                 ignore_eos=True)[0]
    assert run.stdout == want.text + "\n"
    assert "[length; " in run.stderr and "12 completion tokens" in run.stderr


def test_generate_chat_uses_the_template(checkpoints):
    path = str(checkpoints["qwen2"])
    run = llmos("generate", "--model", path, "--chat", "-n", "4", "hi")
    assert run.returncode == 0, run.stderr
    engine = Engine.from_pretrained(path)
    prompt_tokens = len(engine.tokenizer.encode_chat([{"role": "user", "content": "hi"}]))
    assert f"; {prompt_tokens} prompt + " in run.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--top-p", "0"], "top_p"),
    (["--max-tokens", "100000000"], "context length"),
])
def test_generate_bad_input_is_a_clear_error(checkpoints, args, message):
    args = ["--model", str(checkpoints["llama"])] + args if args[0] != "--model" else args
    run = llmos("generate", *args, "hi")
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr


def test_demo_boots_a_kernel_and_runs_the_example_agents():
    """The real thing: a kernel process, three agents and six workers, real answers."""
    run = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "demo"],
                         capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "COLUMNS": "160"})
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    for answer in ("12+47=59", "-> 153", "-> l e n r e k", "tiny: 59", "tiny: t a c"):
        assert answer in out
    assert out.count(": exit 0") == 3 and "KV blocks in use now: 0" in out
    assert "shut down (exit 0)" in out
