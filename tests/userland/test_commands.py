"""The client commands of `llmos` and the example agents, as real subprocesses, on a stub kernel."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.userland.conftest import ROOT

TIMEOUT = 60


def llmos(home, *args, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env["LLMOS_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_client_commands_do_not_import_torch(stub_home):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom llmos.userland.cli import main\n"
            f"for args in (['ps', '--help'], ['ps', '--home', {stub_home!r}], ['mem'], ['models']):\n"
            f"    r = CliRunner().invoke(main, args, env={{'LLMOS_HOME': {stub_home!r}}})\n"
            "    assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr


def test_run_follows_the_output_and_exits_with_the_status(stub_home):
    run = llmos(stub_home, "run", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert run.returncode == 7
    assert run.stdout == "out\nerr\n"


def test_run_a_module_agent(stub_home):
    run = llmos(stub_home, "run", "-m", "llmos.userland.examples.hello", "64+89=")
    assert run.returncode == 0, run.stderr
    assert "64+89=153" in run.stdout


def test_run_a_script_file(stub_home, tmp_path):
    script = tmp_path / "agent.py"
    script.write_text("from llmos.userland import connect\nprint(connect().generate('1+2=').text)\n")
    run = llmos(stub_home, "run", str(script))
    assert (run.returncode, run.stdout) == (0, "3\n"), run.stderr


def test_detached_run_ps_logs_kill(stub_home):
    run = llmos(stub_home, "run", "-d", "--name", "sleeper", "sh", "-c", "echo started; exec sleep 60")
    assert run.returncode == 0, run.stderr
    pid = int(run.stdout)
    ps = llmos(stub_home, "ps")
    assert ps.returncode == 0 and "sleeper" in ps.stdout and "PID" in ps.stdout
    for _ in range(50):
        logs = llmos(stub_home, "logs", str(pid))
        if logs.stdout:
            break
    assert logs.stdout == "started\n"
    assert llmos(stub_home, "kill", "-s", "KILL", str(pid)).returncode == 0


def test_logs_follow_ends_with_the_process(stub_home):
    pid = int(llmos(stub_home, "run", "-d", "sh", "-c", "echo a; sleep 1; echo b").stdout)
    follow = llmos(stub_home, "logs", "-f", str(pid))
    assert follow.returncode == 0 and follow.stdout == "a\nb\n"


def test_mem_and_models(stub_home):
    mem = llmos(stub_home, "mem")
    assert mem.returncode == 0 and "total" in mem.stdout and "1024" in mem.stdout
    models = llmos(stub_home, "models")
    assert models.returncode == 0 and "tiny" in models.stdout


@pytest.mark.parametrize("args, message", [
    (["kill", "99999"], "ESRCH"),
    (["kill", "-s", "HUP", "1"], "EINVAL"),
    (["wait", "1"], "ECHILD"),
    (["logs", "99999"], "no log for pid 99999"),
])
def test_errors_are_one_line(stub_home, args, message):
    run = llmos(stub_home, *args)
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["ps"], ["run", "true"], ["mem"], ["models"], ["kill", "1"],
                                  ["wait", "1"]])
def test_no_kernel_is_a_clear_error(tmp_path, args):
    run = llmos(tmp_path, *args)
    assert run.returncode == 1
    assert "llmos up" in run.stderr and "Traceback" not in run.stderr


def test_parallel_example_collects_every_worker(stub_home):
    run = llmos(stub_home, "run", "-m", "llmos.userland.examples.parallel", "-n", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "-> 59" in run.stdout and "-> t a c" in run.stdout and run.stdout.count("status 0") == 4


def test_chat_example_computes_only_new_tokens(stub_home):
    run = llmos(stub_home, "run", "-m", "llmos.userland.examples.chat")
    assert run.returncode == 0, run.stderr
    assert "tiny: 59" in run.stdout and "tiny: t a c" in run.stdout
    assert run.stdout.count("cached") == 2
