"""The `llmos` command itself (generate, demo, drivers, --version, help), as a real
subprocess; `generate --model` and `drivers` in the test's own process (CliRunner), where
a subprocess would only add seconds of importing torch."""
import json
import os
import subprocess
import sys
from importlib.metadata import version

import click
import pytest
from click.testing import CliRunner

from llmos.kernel import Engine
from llmos.userland import connect
from llmos.userland.cli import main
from tests.userland.test_cli_kernel import T, llmos

TIMEOUT = 120


def llmos_here(*args: str) -> subprocess.CompletedProcess:
    """`llmos ARGS` with no kernel home set up (in-process engines)."""
    return subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


def generate_here(*args: str):
    """`llmos generate ARGS` in this process: the result, with .stdout and .stderr apart."""
    return CliRunner().invoke(main, ["generate", *args])


def test_generate_streams_the_engine_output(checkpoints):
    path = str(checkpoints["llama"])
    run = generate_here("--model", path, "-n", "12", "--ignore-eos", "Hello world")
    assert run.exit_code == 0, run.stderr
    want = Engine.from_pretrained(path).generate(["Hello world"], max_tokens=12,
                                                 ignore_eos=True)[0]
    assert run.stdout == want.text + "\n"
    assert "[length; " in run.stderr and "12 completion tokens" in run.stderr


def test_generate_chat_uses_the_template(checkpoints):
    path = str(checkpoints["qwen2"])
    run = generate_here("--model", path, "--chat", "-n", "4", "hi")
    assert run.exit_code == 0, run.stderr
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
    run = generate_here(*args, "hi")
    assert run.exit_code == 1
    assert message in run.stderr and run.exception.__class__ is SystemExit


def generated_by_the_kernel(home) -> int:
    with connect(home, timeout=T) as k:
        return k.sysinfo().generated_tokens


def test_generate_goes_through_the_kernel_unless_a_model_or_driver_is_given(kernel_home):
    before = generated_by_the_kernel(kernel_home)
    run = llmos(kernel_home, "generate", "12+47=")
    assert (run.returncode, run.stdout) == (0, "59\n"), run.stderr
    served = generated_by_the_kernel(kernel_home)
    assert served > before
    here = llmos(kernel_home, "generate", "--driver", "sim", "12+47=")
    assert (here.returncode, here.stdout) == (0, "59\n"), here.stderr
    assert generated_by_the_kernel(kernel_home) == served           # not through the kernel


def test_version_is_the_package_version():
    run = llmos_here("--version")
    assert run.returncode == 0 and run.stdout.split()[-1] == version("llmos")


def test_every_option_of_every_command_has_help():
    missing = [f"{name} {p.opts[0]}" for name, cmd in main.commands.items()
               for p in cmd.params if isinstance(p, click.Option) and not p.help]
    assert missing == []
    listed = {"ps", "mem", "models", "drivers", "sysinfo", "syscalls", "wait", "up"}
    assert listed <= set(main.commands)


def test_listings_have_json():
    listings = ("ps", "mem", "models", "drivers", "sysinfo", "syscalls", "sched", "limit")
    assert all(any(p.name == "as_json" for p in main.commands[c].params) for c in listings)


def test_drivers_lists_the_registry():
    run = CliRunner().invoke(main, ["drivers", "--json"])
    assert run.exit_code == 0, run.output
    rows = {d["name"]: d for d in json.loads(run.stdout)}
    assert rows["cpu"]["available"] and rows["sim"]["available"]
    assert sum(d["auto"] for d in rows.values()) == 1
    assert set(rows["cpu"]) == {"name", "available", "reason", "device", "memory", "priority",
                                "load_error", "auto"}
    text = CliRunner().invoke(main, ["drivers"])
    assert text.exit_code == 0, text.output
    lines = {line.split()[0]: line.split() for line in text.stdout.splitlines()}
    assert lines["cpu"][1] == "available" and lines["sim"][1] == "available"
    assert text.stdout.splitlines()[-1].startswith("auto: ")


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
