"""Several models in one kernel: names, loading on demand, eviction, keep-alive, pinning,
broken models, loading beside serving. Real kernels on real sockets, real checkpoints."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from llmos.kernel import Engine
from llmos.syscalls.errors import SyscallError
from llmos.userland import connect
from tests.kernels import running_kernel, start_kernel, stop_kernel, short_home, until

T = 120
PROMPT = [5, 6, 7, 8, 9]
GREEDY = dict(max_tokens=12, ignore_eos=True)
# Each model gets a 16M KV pool; 50M holds tiny (9.8M of weights) and one small
# checkpoint (under 1M) beside it, but not a third model.
SMALL = ("--kv-memory", "16M", "--memory", "50M")


@pytest.fixture(scope="module")
def ckpts(checkpoints):
    return {"llama": str(checkpoints["llama"]), "qwen3": str(checkpoints["qwen3"])}


def alone(path: str, prompt=PROMPT) -> list[int]:
    """The greedy output of the model at path in an engine of its own."""
    return Engine.from_pretrained(path, num_blocks=32).generate([prompt], **GREEDY)[0].token_ids


def states(k) -> dict:
    return {m.name: m.state for m in k.models()}


def test_two_models_answer_in_one_kernel_as_each_does_alone(ckpts):
    want = {"tiny": alone("tiny"), ckpts["llama"]: alone(ckpts["llama"])}
    with running_kernel("--model", "tiny", "--model", ckpts["llama"]) as (home, _), \
            connect(home, timeout=T) as k:
        got, errors = {}, []

        def ask(model):
            try:
                with connect(home, timeout=T) as kk:
                    got[model] = [kk.generate(token_ids=PROMPT, model=model, **GREEDY).token_ids
                                  for _ in range(3)]
            except Exception as e:             # noqa: BLE001 — reported below
                errors.append(e)
        threads = [threading.Thread(target=ask, args=(m,)) for m in want]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        assert not errors
        assert got == {m: [ids] * 3 for m, ids in want.items()}
        assert k.generate(token_ids=PROMPT, **GREEDY).token_ids == want["tiny"]   # the default
        assert k.tokenize("12+47=", model=ckpts["llama"]) != k.tokenize("12+47=")
        rows = {m.name: m for m in k.models()}
        assert [rows["tiny"].state, rows[ckpts["llama"]].state] == ["ready", "ready"]
        assert rows["tiny"].default and not rows[ckpts["llama"]].default
        assert rows[ckpts["llama"]].params > 0 and rows[ckpts["llama"]].kv_blocks > 0
        mem = k.meminfo()
        assert set(mem.models) == {"tiny", ckpts["llama"]}
        assert mem.memory_used == sum(m.weight_bytes + m.kv_bytes for m in mem.models.values())
        assert mem.kv.total == sum(m.kv.total for m in mem.models.values())
        assert k.sysinfo().models == ["tiny", ckpts["llama"]]


def test_idle_model_is_evicted_pinned_ones_never_and_enomem_names_the_holders(ckpts):
    with running_kernel("--model", "tiny", *SMALL) as (home, _), connect(home, timeout=T) as k:
        k.model_add("llama", ckpts["llama"])
        k.model_add("qwen", ckpts["qwen3"])
        first = k.generate(token_ids=PROMPT, **GREEDY).token_ids
        # a context pins llama; tiny is idle and the least recently used: it goes for qwen
        with k.context(model="llama") as ctx:
            assert ctx.generate(token_ids=PROMPT, **GREEDY).token_ids == alone(ckpts["llama"])
            assert states(k)["llama"] == "ready"
            assert k.generate(token_ids=PROMPT, model="qwen", **GREEDY).token_ids == \
                alone(ckpts["qwen3"])
            assert states(k) == {"llama": "ready", "qwen": "ready"}
            with k.context(model="qwen"):
                # both pinned: tiny cannot come back, and the error says who holds what
                with pytest.raises(SyscallError) as err:
                    k.generate(token_ids=PROMPT, **GREEDY)
                assert err.value.code == "ENOMEM"
                assert "llama" in err.value.msg and "qwen" in err.value.msg
                assert "context" in err.value.msg
            # qwen's context is gone: qwen is idle and goes; tiny comes back, the same
            assert k.generate(token_ids=PROMPT, **GREEDY).token_ids == first
            assert states(k) == {"llama": "ready", "tiny": "ready", "qwen": "registered"}
        with pytest.raises(SyscallError) as err:          # in use: not unloaded by hand
            with k.context(model="tiny"):
                k.model_unload("tiny")
        assert err.value.code == "EBUSY"
        k.model_unload("llama")
        assert states(k)["llama"] == "registered"


@pytest.mark.parametrize("models, memory, why", [
    (["tiny"], "10M", "more than the whole memory budget"),
    (["tiny", "llama"], "30M", "budget is held by tiny"),   # boot models never evict each other
])
def test_boot_models_that_do_not_fit_do_not_boot(ckpts, models, memory, why):
    import subprocess
    import sys
    home = short_home()
    argv = [a for m in models for a in ("--model", ckpts.get(m, m))]
    out = subprocess.run([sys.executable, "-m", "llmos.kernel", "--home", home, *argv,
                          "--kv-memory", "16M", "--memory", memory],
                         capture_output=True, text=True, timeout=T)
    os.system(f"rm -rf {home}")
    assert out.returncode == 2, out.stderr
    assert "ENOMEM" in out.stderr and why in out.stderr and "Traceback" not in out.stderr


def test_a_name_registered_anew_serves_the_new_model(ckpts):
    with running_kernel("--model", "tiny") as (home, _), connect(home, timeout=T) as k:
        k.model_add("m", ckpts["llama"])
        assert k.generate(token_ids=PROMPT, model="m", **GREEDY).token_ids == alone(ckpts["llama"])
        k.model_rm("m")
        k.model_add("m", ckpts["qwen3"])
        assert k.tokenize("12+47=", model="m") == \
            Engine.from_pretrained(ckpts["qwen3"], num_blocks=8).tokenizer.encode("12+47=")
        assert k.generate(token_ids=PROMPT, model="m", **GREEDY).token_ids == alone(ckpts["qwen3"])
        assert {m.name: m.path for m in k.models()}["m"] == ckpts["qwen3"]


def test_eviction_that_cannot_make_room_evicts_nothing():
    from llmos.drivers.cpu import CpuDriver
    from llmos.kernel.modeltable import READY, ModelTable, Slot
    from llmos.kernel.registry import ModelSpec
    from tests.kernel.stepper import Clock
    table = ModelTable(CpuDriver(), 100, clock=Clock())
    idle, busy = Steps(table.clock, 1.0), Steps(table.clock, 1.0)
    busy.requests = {1: object()}
    for name, engine, size in (("idle", idle, 20), ("busy", busy, 70)):
        table.slots[name] = Slot(ModelSpec(name, "/m"), None, 60, state=READY, engine=engine,
                                 bytes=size)
    with pytest.raises(SyscallError) as err:
        table._make_room("new", 50)
    assert err.value.code == "ENOMEM" and "busy 70 B (1 request(s))" in err.value.msg
    assert set(table.slots) == {"idle", "busy"} and table.unloads == 0


def test_keep_alive_unloads_an_idle_model_and_counts_from_its_last_use(ckpts):
    import time
    with running_kernel("--model", "tiny", "--keep-alive", "5") as (home, _), \
            connect(home, timeout=T) as k:
        k.model_add("llama", ckpts["llama"])
        k.generate(token_ids=PROMPT, model="llama", **GREEDY)     # loaded on demand
        until(lambda: states(k)["llama"] == "registered", "llama unloaded", T)
        with k.context(model="llama"):                           # pinned while it lives
            time.sleep(6)
            assert states(k)["llama"] == "ready"
        assert states(k)["llama"] == "ready"           # idle from the context's end, not before
        until(lambda: states(k)["llama"] == "registered", "llama unloaded again", T)
        assert states(k)["tiny"] == "ready"                      # boot models stay
        k.model_load("llama", keep_alive=-1)                     # for ever, this load
        assert {m.name: m.keep_alive for m in k.models()}["llama"] is None


def test_a_broken_model_fails_only_its_own_call(tmp_path, ckpts):
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text("{not json")
    bad_weights = tmp_path / "bad_weights"
    bad_weights.mkdir()
    for f in Path(ckpts["llama"]).iterdir():
        (bad_weights / f.name).write_bytes(f.read_bytes())
    data = (bad_weights / "model.safetensors").read_bytes()
    (bad_weights / "model.safetensors").write_bytes(data[:len(data) // 2])   # truncated
    with running_kernel("--model", "tiny") as (home, _), connect(home, timeout=T) as k:
        want = k.generate(token_ids=PROMPT, **GREEDY).token_ids
        with pytest.raises(SyscallError) as err:
            k.generate(token_ids=PROMPT, model=str(bad_config), **GREEDY)
        assert err.value.code == "EINVAL" and "config.json" in err.value.msg
        with pytest.raises(SyscallError) as err:                  # fails on the loader thread
            k.generate(token_ids=PROMPT, model=str(bad_weights), **GREEDY)
        assert err.value.code == "EINVAL" and "model.safetensors" in err.value.msg
        with pytest.raises(SyscallError) as err:
            k.model_add("broken", str(bad_config))
        assert err.value.code == "EINVAL"
        assert k.generate(token_ids=PROMPT, **GREEDY).token_ids == want
        assert states(k) == {"tiny": "ready"}


def test_other_models_decode_while_one_loads(tmp_path, ckpts):
    gate = tmp_path / "go"
    home = short_home()
    proc = start_kernel(home, "--model", "tiny", env={"LLMOS_FAULT": f"load-wait:{gate}"})
    try:
        with connect(home, timeout=T) as k:
            result = {}
            loader = threading.Thread(target=lambda: result.setdefault(
                "ids", k.generate(token_ids=PROMPT, model=ckpts["llama"], **GREEDY).token_ids))
            loader.start()
            until(lambda: states(k).get(ckpts["llama"]) == "loading", "llama loading", T)
            for _ in range(3):                   # tiny serves while llama's load is held
                assert k.generate("12+47=", max_tokens=4).text
            assert states(k)[ckpts["llama"]] == "loading" and "ids" not in result
            gate.touch()
            loader.join(T)
            assert result["ids"] == alone(ckpts["llama"])
    finally:
        stop_kernel(proc)


def test_registry_persists_and_the_cli_drives_it(ckpts):
    from tests.userland.test_commands import llmos
    home = short_home()
    proc = start_kernel(home)
    try:
        add = llmos(home, "models", "add", "smol", ckpts["llama"], "--keep-alive", "10m")
        assert add.returncode == 0, add.stderr
        assert llmos(home, "models", "add", "smol", ckpts["llama"]).returncode == 1  # EEXIST
        load = llmos(home, "models", "load", "smol")
        assert load.returncode == 0 and "loaded in" in load.stdout
        listing = llmos(home, "models").stdout.splitlines()
        assert [line.split()[:2] for line in listing[1:]] == [["tiny", "*"], ["smol", "ready"]]
        gen = llmos(home, "generate", "--model", "smol", "-n", "4", "--ignore-eos", "Hello")
        assert gen.returncode == 0 and "4 completion tokens" in gen.stderr      # the kernel's
        assert llmos(home, "models", "unload", "smol").returncode == 0
        assert "registered" in llmos(home, "models").stdout
    finally:
        stop_kernel(proc)
    assert 'path = "' in (Path(home) / "models.toml").read_text()
    proc = start_kernel(home)                                    # a new boot: still there
    try:
        with connect(home, timeout=T) as k:
            assert states(k) == {"tiny": "ready", "smol": "registered"}
            assert k.generate(token_ids=PROMPT, model="smol", **GREEDY).token_ids == \
                alone(ckpts["llama"])
            k.model_rm("smol")
            with pytest.raises(SyscallError) as err:
                k.generate(token_ids=PROMPT, model="smol", **GREEDY)
            assert err.value.code == "ENOENT"
    finally:
        stop_kernel(proc)
    assert "smol" not in (Path(home) / "models.toml").read_text()
    os.system(f"rm -rf {home}")


def test_keep_alive_and_budget_options_mean_what_they_say():
    import subprocess
    import sys

    from llmos.drivers.cpu import CpuDriver
    from llmos.kernel.modeltable import FOREVER, ModelTable
    assert ModelTable(CpuDriver(), 1 << 30, keep_alive=-1).keep_alive == FOREVER   # -1: for ever
    assert ModelTable(CpuDriver(), 1 << 30, keep_alive=90).keep_alive == 90
    assert ModelTable(CpuDriver(), 1 << 30).keep_alive == 300                      # 5 minutes
    assert ModelTable(CpuDriver()).budget <= 8 << 30                             # capped on a CPU
    helped = subprocess.run([sys.executable, "-m", "llmos.kernel", "--help"],
                            capture_output=True, text=True, timeout=T)
    assert helped.returncode == 0 and "--keep-alive" in helped.stdout


class Steps:
    """A stand-in engine for the table's choice of whom to step: each step takes `cost`
    seconds of the table's (fake) clock; `work` says whether it has any."""
    requests, contexts = {}, {}

    def __init__(self, clock, cost: float):
        self.clock, self.cost, self.work, self.steps = clock, cost, True, 0

    def has_work(self) -> bool:
        return self.work

    def step(self) -> None:
        self.clock.t += self.cost
        self.steps += 1


def test_models_share_the_engine_thread_by_time_not_by_steps():
    from llmos.drivers.cpu import CpuDriver
    from llmos.kernel.modeltable import READY, ModelTable, Slot
    from llmos.kernel.registry import ModelSpec
    from tests.kernel.stepper import Clock
    clock = Clock()
    table = ModelTable(CpuDriver(), 1 << 30, clock=clock)
    slow, fast = Steps(clock, 10.0), Steps(clock, 1.0)
    for name, engine in (("slow", slow), ("fast", fast)):
        table.slots[name] = Slot(ModelSpec(name, "/m"), None, 60, state=READY, engine=engine)
    for _ in range(220):
        table.step()
    assert slow.steps == 20 and fast.steps == 200           # equal time: 200 s each
    fast.work = False
    for _ in range(10):                                       # fast idle: slow runs alone
        table.step()
    fast.work = True
    picks = []
    for _ in range(22):
        before = fast.steps
        table.step()
        picks.append("fast" if fast.steps > before else "slow")
    # back from idle, fast starts level with slow: it does not take 100 s of catching up
    assert picks.count("slow") == 2 and "slow" in picks[:11]
