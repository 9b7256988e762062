"""The client commands of `llmos` and the example agents, as real subprocesses, against a
real kernel on the embedded tiny model (one per module)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from llmos.syscalls.home import Home
from llmos.syscalls.types import (KVInfo, Limits, MemInfo, ModelInfo, ProcInfo, SchedInfo,
                                  SyscallInfo, SysInfo)
from llmos.userland import connect
from tests.kernels import ROOT
from tests.userland.test_cli_kernel import T, llmos


def fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def spawned(home, *args) -> int:
    """`llmos run -d ARGS`: the pid."""
    run = llmos(home, "run", "-d", *args)
    assert run.returncode == 0, run.stderr
    return int(run.stdout)


def eventually(check, what: str):
    """check()'s first truthy value, polling for up to T seconds."""
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {T}s: {what}")


def test_client_commands_do_not_import_torch(kernel_home):
    code = ("import sys\nfrom click.testing import CliRunner\nfrom llmos.userland.cli import main\n"
            f"for args in (['ps', '--help'], ['ps', '--home', {kernel_home!r}], ['mem'],\n"
            "             ['models'], ['sysinfo', '--json'], ['syscalls']):\n"
            f"    r = CliRunner().invoke(main, args, env={{'LLMOS_HOME': {kernel_home!r}}})\n"
            "    assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert not any(m.startswith('llmos.kernel') for m in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=T)
    assert run.returncode == 0, run.stderr


# ---- listings ----------------------------------------------------------------------------

def test_every_listing_has_json_with_the_fields_of_its_record(kernel_home):
    pid = spawned(kernel_home, "--name", "json-sleeper", "sleep", "30")
    try:
        ps = json.loads(llmos(kernel_home, "ps", "--json").stdout)
        assert isinstance(ps, list) and all(set(p) == fields(ProcInfo) for p in ps)
        row = next(p for p in ps if p["pid"] == pid)
        assert row["name"] == "json-sleeper" and row["state"] == "sleeping"
        mem = json.loads(llmos(kernel_home, "mem", "--json").stdout)
        assert set(mem) == fields(MemInfo) and set(mem["kv"]) == fields(KVInfo)
        assert mem["kv"]["total"] > 0 and mem["kv"]["block_size"] > 0
        models = json.loads(llmos(kernel_home, "models", "--json").stdout)
        assert [m["name"] for m in models] == ["tiny"] and set(models[0]) == fields(ModelInfo)
        info = json.loads(llmos(kernel_home, "sysinfo", "--json").stdout)
        assert set(info) == fields(SysInfo) and info["model"] == "tiny"
        table = json.loads(llmos(kernel_home, "syscalls", "--json").stdout)
        assert all(set(s) == fields(SyscallInfo) for s in table)
        assert {"ps", "wait", "generate"} <= {s["name"] for s in table}
    finally:
        llmos(kernel_home, "kill", "-s", "KILL", str(pid))


def test_ps_through_a_pipe_shows_a_long_name_whole(kernel_home):
    name = "a-process-with-a-name-sixty-characters-long-for-ps-" + "x" * 9
    assert len(name) == 60
    pid = spawned(kernel_home, "--name", name, "sleep", "30")
    try:
        ps = llmos(kernel_home, "ps")
        assert ps.returncode == 0
        header, *rows = ps.stdout.splitlines()
        assert header.split() == ["PID", "PPID", "STATE", "NI", "KV", "CALLS", "CTX", "TOK_IN",
                                  "TOK_OUT", "CPU%", "RSS", "AGE", "OS_PID", "NAME"]
        row = next(r for r in rows if r.split()[0] == str(pid))
        assert row[header.index("NAME"):] == name and row.split()[2] == "sleeping"
    finally:
        llmos(kernel_home, "kill", "-s", "KILL", str(pid))


def test_mem_models_sysinfo_as_columns(kernel_home):
    mem = llmos(kernel_home, "mem")
    assert mem.returncode == 0 and "KV memory in blocks of" in mem.stdout
    assert [line.split()[0] for line in mem.stdout.splitlines()[2:8]] == [
        "total", "used", "cached", "free", "swap_total", "swap_free"]
    models = llmos(kernel_home, "models")
    assert models.returncode == 0
    assert models.stdout.splitlines()[1].split()[:4] == ["tiny", "*", "ready", "llama"]
    assert models.stdout.rstrip().endswith(os.path.join("tiny", "model"))      # path whole
    info = llmos(kernel_home, "sysinfo")
    rows = dict(line.split(None, 1) for line in info.stdout.splitlines()[1:])
    assert rows["model"] == "tiny" and rows["driver"] == "cpu"
    assert (rows["agent_user"], rows["isolation"]) == ("-", "none")   # agents share our uid


def test_ps_long_adds_the_schedulers_columns_and_mem_shows_each_process(kernel_home):
    with connect(kernel_home, timeout=T) as k, k.context(system="You are tiny.") as ctx:
        ctx.generate("12+47=", max_tokens=4)
        held = ctx.info().blocks
        ps = llmos(kernel_home, "ps", "-l")
        assert ps.returncode == 0, ps.stderr
        header, *rows = ps.stdout.splitlines()
        assert header.split() == ["PID", "PPID", "STATE", "NI", "KV", "KV_SWAP", "KV_DISK",
                                  "CALLS", "CTX", "TOK_IN", "TOK_OUT", "SERVICE", "QUEUED",
                                  "RUNNING", "PREEMPT", "SWAPS", "CPU%", "RSS", "AGE", "OS_PID",
                                  "NAME"]
        mine = next(r for r in rows if r.split()[0] == str(k.pid))
        mine = dict(zip(header.split(), mine.split()))
        assert int(mine["SERVICE"]) == int(mine["TOK_IN"]) + int(mine["TOK_OUT"]) > 0
        assert mine["RUNNING"].endswith("s") and int(mine["KV"]) == held
        mem = eventually(lambda: (m := llmos(kernel_home, "mem")).stdout.count("\n\n") and m,
                         "the per-process table")
        table = mem.stdout.split("\n\n")[1].splitlines()
        assert table[0].split() == ["PID", "RESIDENT", "SWAPPED", "DISK", "TOKENS"]
        assert [str(k.pid), str(held), "0", "0"] in [line.split()[:4] for line in table[1:]]
        assert "disk_total" in mem.stdout.split("\n\n")[0]


def test_sched_lists_the_policies_marking_the_one_in_force(kernel_home):
    run = llmos(kernel_home, "sched")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    marked = [line[2:] for line in lines if line.startswith("* ")]
    assert len(marked) == 1 and {line[2:] for line in lines} == {"fifo", "priority", "fair", "las"}
    info = json.loads(llmos(kernel_home, "sched", "--json").stdout)
    assert set(info) == fields(SchedInfo) and info["policy"] == marked[0]
    other = next(p for p in info["policies"] if p != marked[0])
    try:
        switched = llmos(kernel_home, "sched", other)
        assert switched.returncode == 0 and f"* {other}" in switched.stdout.splitlines()
    finally:
        assert llmos(kernel_home, "sched", marked[0]).returncode == 0


def test_limit_shows_and_sets_and_run_sets_a_childs(kernel_home):
    defaults = llmos(kernel_home, "limit")
    assert defaults.returncode == 0, defaults.stderr
    rows = dict(line.split() for line in defaults.stdout.splitlines()[1:])
    assert rows["calls"] == "512" and rows["tokens_per_s"] == "unlimited"
    # Above the defaults: `llmos` is the owner, who may raise a limit.
    pid = spawned(kernel_home, "--limit", "calls=600", "--limit", "tokens_per_s=20", "sleep", "30")
    try:
        shown = json.loads(llmos(kernel_home, "limit", str(pid), "--json").stdout)
        assert set(shown) == fields(Limits) and (shown["calls"], shown["tokens_per_s"]) == (600, 20)
        changed = llmos(kernel_home, "limit", str(pid), "calls=unlimited", "contexts=2")
        assert changed.returncode == 0, changed.stderr
        rows = dict(line.split() for line in changed.stdout.splitlines()[1:])
        assert (rows["calls"], rows["contexts"], rows["tokens_per_s"]) == ("unlimited", "2", "20")
        for args in (["calls=2"], [str(pid), "cpu=1"], [str(pid), "calls=-1"]):
            bad = llmos(kernel_home, "limit", *args)
            assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
        bad = llmos(kernel_home, "run", "--limit", "calls", "true")
        assert bad.returncode == 2 and "expected NAME=VALUE" in bad.stderr
    finally:
        llmos(kernel_home, "kill", "-s", "KILL", str(pid))


def test_syscalls_lists_the_table(kernel_home):
    run = llmos(kernel_home, "syscalls")
    assert run.returncode == 0, run.stderr
    rows = {line.split()[1]: line for line in run.stdout.splitlines()[1:]}
    assert rows["wait"].split()[0] == "6" and "pid:int [timeout:float]" in rows["wait"]
    assert "one of prompt|messages|token_ids" in rows["generate"]
    assert all(line.split()[2] in ("yes", "no") for line in rows.values())


# ---- run, wait, logs, kill ---------------------------------------------------------------

def test_run_follows_the_output_and_exits_with_the_status(kernel_home):
    run = llmos(kernel_home, "run", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert run.returncode == 7
    assert run.stdout == "out\nerr\n"


def test_run_a_module_agent(kernel_home):
    run = llmos(kernel_home, "run", "-m", "llmos.userland.examples.hello", "64+89=")
    assert run.returncode == 0, run.stderr
    assert "64+89=153" in run.stdout


def test_run_a_script_file(kernel_home, tmp_path):
    script = tmp_path / "agent.py"
    script.write_text("from llmos.userland import connect\n"
                      "print(connect().generate('12+47=', max_tokens=8, stop='\\n').text)\n")
    run = llmos(kernel_home, "run", str(script))
    assert (run.returncode, run.stdout) == (0, "59\n"), run.stderr


def test_wait_from_a_second_call_prints_the_status_and_exits_with_it(kernel_home):
    pid = spawned(kernel_home, "sh", "-c", "exit 7")
    wait = llmos(kernel_home, "wait", str(pid))
    assert (wait.returncode, wait.stdout) == (7, "7\n"), wait.stderr
    killed = spawned(kernel_home, "sleep", "30")
    assert llmos(kernel_home, "kill", "-s", "KILL", str(killed)).returncode == 0
    wait = llmos(kernel_home, "wait", str(killed))
    assert (wait.returncode, wait.stdout) == (128 + 9, "-9\n")
    again = llmos(kernel_home, "wait", str(pid))             # collected: gone
    assert again.returncode == 1 and "ESRCH" in again.stderr


def test_wait_with_a_timeout_on_a_running_process(kernel_home):
    pid = spawned(kernel_home, "sleep", "30")
    try:
        wait = llmos(kernel_home, "wait", "--timeout", "0.2", str(pid))
        assert wait.returncode == 1 and wait.stdout == ""
        assert f"pid {pid} is still running after 0.2s" in wait.stderr
    finally:
        llmos(kernel_home, "kill", "-s", "KILL", str(pid))


def test_ctrl_c_on_run_interrupts_the_agent_and_exits_130(kernel_home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env["LLMOS_HOME"] = kernel_home
    agent = "import time; print('up', flush=True); time.sleep(60)"
    cli = subprocess.Popen([sys.executable, "-m", "llmos.userland.cli", "run", "--name",
                            "ctrl-c-agent", sys.executable, "-c", agent], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with connect(kernel_home, timeout=T) as k:
            pid = eventually(lambda: next((p.pid for p in k.ps() if p.name == "ctrl-c-agent"),
                                          None), "the agent runs")
            log = Home(kernel_home).proc_log(pid)
            eventually(lambda: log.exists() and log.read_text() == "up\n", "the agent is up")
            cli.send_signal(signal.SIGINT)
            out, err = cli.communicate(timeout=T)
            assert cli.returncode == 130, err
            assert out.startswith("up\n") and f"sending INT to pid {pid}" in err
            assert pid not in {p.pid for p in k.ps()}          # collected by `llmos run`
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate(timeout=T)


def test_the_log_of_a_finished_agent_stays_intact(kernel_home):
    lines = "".join(f"line {i}\n" for i in range(200))
    pid = spawned(kernel_home, "sh", "-c", "for i in $(seq 0 199); do echo line $i; done")
    assert llmos(kernel_home, "wait", str(pid)).returncode == 0
    assert llmos(kernel_home, "logs", str(pid)).stdout == lines
    later = [spawned(kernel_home, "sh", "-c", "echo later") for _ in range(3)]
    assert pid not in later                                    # pids are not reused
    for p in later:
        llmos(kernel_home, "wait", str(p))
    assert llmos(kernel_home, "logs", str(pid)).stdout == lines
    assert Home(kernel_home).proc_log(pid).read_text() == lines


def test_detached_run_ps_logs_kill(kernel_home):
    pid = spawned(kernel_home, "--name", "sleeper", "sh", "-c", "echo started; exec sleep 60")
    ps = llmos(kernel_home, "ps")
    assert ps.returncode == 0 and "sleeper" in ps.stdout
    eventually(lambda: llmos(kernel_home, "logs", str(pid)).stdout == "started\n", "the log")
    assert llmos(kernel_home, "kill", "-s", "sigkill", str(pid)).returncode == 0
    assert llmos(kernel_home, "wait", str(pid)).returncode == 128 + 9


def test_logs_follow_ends_with_the_process(kernel_home):
    pid = spawned(kernel_home, "sh", "-c", "echo a; sleep 1; echo b")
    follow = llmos(kernel_home, "logs", "-f", str(pid))
    assert follow.returncode == 0 and follow.stdout == "a\nb\n"


@pytest.mark.parametrize("args, message", [
    (["kill", "99999"], "ESRCH"),
    (["kill", "-s", "HUP", "1"], "EINVAL"),
    (["wait", "99999"], "ESRCH"),
    (["logs", "99999"], "no log for pid 99999"),
    (["sched", "round-robin"], "EINVAL: sched: no policy 'round-robin'"),
    (["limit", "99999"], "ESRCH"),
])
def test_errors_are_one_line(kernel_home, args, message):
    run = llmos(kernel_home, *args)
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["ps"], ["run", "true"], ["mem"], ["models"], ["sysinfo"],
                                  ["syscalls"], ["kill", "1"], ["wait", "1"], ["sched"],
                                  ["limit"]])
def test_no_kernel_is_a_clear_error(tmp_path, args):
    run = llmos(tmp_path, *args)
    assert run.returncode == 1
    assert "llmos up" in run.stderr and "Traceback" not in run.stderr


# ---- the example agents ------------------------------------------------------------------

def test_parallel_example_collects_every_worker(kernel_home):
    run = llmos(kernel_home, "run", "-m", "llmos.userland.examples.parallel", "-n", "4")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "-> 59" in run.stdout and "-> t a c" in run.stdout and run.stdout.count("status 0") == 4


def test_chat_example_computes_only_new_tokens(kernel_home):
    run = llmos(kernel_home, "run", "-m", "llmos.userland.examples.chat")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "tiny: 59" in run.stdout and "tiny: t a c" in run.stdout
    assert run.stdout.count("cached") == 2


def test_top_batch_and_json_show_every_column_and_each_process_rate(kernel_home):
    import threading
    from llmos.userland.top import TOP_HEADER
    with connect(kernel_home, timeout=T) as k:
        worker = threading.Thread(target=lambda: k.generate("12+47=", max_tokens=400,
                                                            ignore_eos=True))
        worker.start()
        try:
            # the kernel measures each process's rate (ps carries it): no client arithmetic
            eventually(lambda: any(p.pid == k.pid and p.tok_out_s > 0 for p in k.ps()),
                       "a tokens/s figure for the generating process")
            out = llmos(kernel_home, "top", "-b", "-n", "2", "-d", "0.3")
            js = llmos(kernel_home, "top", "--json", "-n", "2", "-d", "0.3")
        finally:
            worker.join(T)
    assert out.returncode == 0, out.stderr
    shots = out.stdout.strip().split("\n\n")
    assert len(shots) == 2 and all(s.startswith("llmos top - ") for s in shots)
    for shot in shots:
        lines = shot.splitlines()
        assert "models: tiny*" in lines[0] and "policy fair" in lines[0]
        assert lines[1].startswith("procs: ") and lines[2].startswith("tokens/s in/out: ")
        assert re.search(r"; requests \d+ running, \d+ waiting; ttft p50 (<=[\d.]+s|-) p99 ", lines[2])
        assert lines[3].startswith("KV   [") and lines[4].startswith("swap [")
        assert lines[5].startswith("host cpu ")
        assert lines[6].split() == TOP_HEADER
        rows = [dict(zip(TOP_HEADER, line.split(None, len(TOP_HEADER) - 1)))
                for line in lines[7:]]
        assert {r["NAME"] for r in rows} >= {"attached"}
    assert "-/- (last)" in shots[0] and "-/- (last)" not in shots[1]   # a rate needs two
    mine = next(r for r in rows if r["PID"] == str(k.pid))
    assert mine["STATE"] in ("running", "ready", "sleeping") and int(mine["TOK_OUT"]) > 0
    snaps = [json.loads(line) for line in js.stdout.splitlines()]
    assert len(snaps) == 2 and snaps[0]["rates"]["last"] is None
    assert snaps[1]["rates"]["last"] is not None and snaps[1]["procs"]
    assert {"tok_in_s", "tok_out_s"} <= set(snaps[1]["procs"][0])
    assert snaps[1]["metrics"]["models"][0]["ttft"]["count"] > 0    # the kernel's metrics
