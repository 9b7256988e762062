"""`llmos up` and `llmos down` against real kernel processes, and `llmos(home, ...)`, how
test_cli.py and test_commands.py run the CLI (against conftest's `kernel_home`)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest

from llmos.syscalls.home import Home
from tests.kernels import ROOT, short_home

T = 60                  # seconds: the bound on every wait here


def llmos(home, *args, timeout=T) -> subprocess.CompletedProcess:
    """Run `llmos ARGS` on home (as $LLMOS_HOME) as a subprocess; stdout is a pipe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env["LLMOS_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "llmos.userland.cli", *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


# ---- up and down -----------------------------------------------------------------------

@pytest.mark.parametrize("detach", [["-d"], []])
def test_up_on_a_live_home_refuses_at_once(kernel_home, detach):
    pid = Home(kernel_home).running_pid()
    run = llmos(kernel_home, "up", *detach)
    assert run.returncode != 0
    assert f"a kernel is already running on {kernel_home} (pid {pid})" in run.stderr
    assert "listening" not in run.stdout and Home(kernel_home).running_pid() == pid


def test_up_with_a_bad_model_prints_the_kernels_error(tmp_path):
    home = Home(short_home())
    try:
        home.log_dir.mkdir(mode=0o700)
        home.kernel_out.write_text("llmos kernel: the error of an earlier launch\n")
        (tmp_path / "model").mkdir()
        run = llmos(home.path, "up", "-d", "--model", str(tmp_path / "model"))
        assert run.returncode != 0
        assert "llmos kernel: " in run.stderr and "config.json" in run.stderr
        assert "earlier launch" not in run.stderr             # only this launch's output
        assert "Traceback" not in run.stderr and "listening" not in run.stdout
        assert stat.S_IMODE(os.stat(home.kernel_out).st_mode) == 0o600
    finally:
        shutil.rmtree(home.path, ignore_errors=True)


def test_up_detached_starts_a_new_kernel_out_once_it_is_big(tmp_path):
    from llmos.userland.kernelctl import KERNEL_OUT_MAX
    home = Home(short_home())
    try:
        home.log_dir.mkdir(mode=0o700)
        home.kernel_out.write_text("x" * KERNEL_OUT_MAX + "\nthe end of an earlier launch\n")
        (tmp_path / "model").mkdir()
        run = llmos(home.path, "up", "-d", "--model", str(tmp_path / "model"))
        assert run.returncode != 0 and "config.json" in run.stderr
        old = home.kernel_out.with_name("kernel.out.1").read_text()
        assert old.endswith("the end of an earlier launch\n")
        assert "config.json" in home.kernel_out.read_text()
        assert home.kernel_out.stat().st_size < 4096
    finally:
        shutil.rmtree(home.path, ignore_errors=True)


def test_up_will_not_write_through_a_symlinked_kernel_out(tmp_path):
    home = Home(short_home())
    try:
        home.log_dir.mkdir(mode=0o700)
        target = tmp_path / "elsewhere"
        home.kernel_out.symlink_to(target)
        run = llmos(home.path, "up", "-d")
        assert run.returncode != 0 and str(home.kernel_out) in run.stderr
        assert not target.exists() and home.running_pid() is None
    finally:
        shutil.rmtree(home.path, ignore_errors=True)


def test_up_detached_reports_the_kernel_it_started_and_down_stops_it():
    home = Home(short_home())
    try:
        up = llmos(home.path, "up", "-d", "--kv-memory", "16M")
        assert up.returncode == 0, up.stderr
        pid = home.running_pid()
        assert up.stdout == f"llmos kernel {pid} listening on {home.socket_url}\n"
        assert llmos(home.path, "ps").returncode == 0
        down = llmos(home.path, "down")
        assert (down.returncode, down.stdout) == (0, f"llmos kernel {pid} stopped\n")
        assert home.running_pid() is None
    finally:
        if home.running_pid():
            os.kill(home.running_pid(), signal.SIGKILL)
        shutil.rmtree(home.path, ignore_errors=True)


def test_up_passes_the_scheduling_paging_and_limit_options_to_the_kernel():
    home = Home(short_home())
    try:
        up = llmos(home.path, "up", "-d", "--kv-memory", "16M", "--sched", "fifo",
                   "--kv-ttl", "0.5", "--kv-disk", "1M", "--limit", "calls=7",
                   "--limit", "tokens_per_s=2.5", "--limit", "children=unlimited")
        assert up.returncode == 0, up.stderr
        assert llmos(home.path, "sched").stdout.splitlines()[0] == "* fifo"
        limits = dict(line.split() for line in llmos(home.path, "limit").stdout.splitlines()[1:])
        assert (limits["calls"], limits["tokens_per_s"], limits["children"]) == (
            "7", "2.5", "unlimited")
        mem = json.loads(llmos(home.path, "mem", "--json").stdout)
        assert mem["disk_total"] > 0                      # 1M of 32 KiB blocks
        assert stat.S_IMODE(os.stat(home.kv_dir).st_mode) == 0o700
        assert llmos(home.path, "down").returncode == 0
    finally:
        if home.running_pid():
            os.kill(home.running_pid(), signal.SIGKILL)
        shutil.rmtree(home.path, ignore_errors=True)


@pytest.mark.parametrize("option, words", [
    (["--limit", "cpu=1"], "NAME one of calls"), (["--limit", "calls=-1"], "below the minimum 0"),
    (["--kv-ttl", "-1"], "-1"), (["--sched", "round-robin"], "round-robin"),
])
def test_up_with_a_bad_option_is_a_clear_error(option, words):
    home = short_home()
    try:
        run = llmos(home, "up", "-d", "--kv-memory", "16M", *option)
        assert run.returncode != 0 and words in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and Home(home).running_pid() is None
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_down_without_a_kernel_is_a_clear_error():
    home = short_home()
    try:
        run = llmos(home, "down")
        assert run.returncode == 1 and f"no kernel is running on {home}" in run.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
