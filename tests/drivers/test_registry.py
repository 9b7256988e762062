"""The driver registry: entry points, LLMOS_DRIVERS, refusal of broken plugins, the sim
plugin installed from examples/llmos-driver-sim, and `llmos drivers`."""
import json
import subprocess
import sys
from importlib.metadata import EntryPoint, entry_points

import pytest
import torch

import llmos.drivers.registry as registry_mod
from llmos.drivers import (CpuDriver, Driver, DriverRefused, OutOfDeviceMemory, Registry,
                           get_driver, list_drivers, load_errors, register, unregister)
from llmos.drivers.registry import GROUP, current

HERE = __name__  # broken plugins below are loaded through entry points naming this module


class NoStoreKv(Driver):  # forgets store_kv
    name = "nostore"
    device = torch.device("cpu")

    @classmethod
    def is_available(cls):
        return True

    def memory_info(self):
        return 1, 1

    def paged_attention(self, *args):
        raise NotImplementedError


class Nameless(Driver):  # complete but for its name
    device = torch.device("cpu")
    is_available = NoStoreKv.is_available
    memory_info = NoStoreKv.memory_info
    paged_attention = NoStoreKv.paged_attention

    def store_kv(self, *args):
        raise NotImplementedError


class Fast(CpuDriver):  # an available plugin that "auto" should prefer to cpu
    name = "fast"
    priority = 5


class Absent(CpuDriver):
    name = "absent"

    @classmethod
    def is_available(cls):
        return False

    @classmethod
    def unavailable_reason(cls):
        return "no absent accelerator on this machine"


def ep(name, value):
    return EntryPoint(name, value, GROUP)


@pytest.fixture
def fresh(monkeypatch):
    """The process registry reloads inside the test and is restored after it."""
    monkeypatch.setattr(registry_mod, "_registry", None)
    return monkeypatch


def test_builtins_register_through_entry_points():
    names = {e.name: e.value for e in entry_points(group=GROUP)}
    assert names["cpu"] == "llmos.drivers.cpu:CpuDriver"
    assert "cuda" in names  # loads, or is a load error: never missing
    assert current().drivers["cpu"] is CpuDriver
    rows = {r.name: r for r in list_drivers()}
    cpu = rows["cpu"]
    assert cpu.available and cpu.device == "cpu" and cpu.memory[0] <= cpu.memory[1]
    assert "cuda" in rows


def test_llmos_drivers_limits_loading(fresh):
    fresh.setenv("LLMOS_DRIVERS", "cpu, nosuch")
    reg = current()
    assert set(reg.drivers) == {"cpu"}
    assert "nosuch" in reg.errors and "LLMOS_DRIVERS" in reg.errors["nosuch"]
    with pytest.raises(ValueError, match="unknown driver 'sim'"):
        get_driver("sim")
    assert get_driver("auto").name == "cpu"


def test_missing_op_is_refused_naming_it():
    with pytest.raises(DriverRefused, match="missing: store_kv"):
        Registry().register(NoStoreKv)
    with pytest.raises(DriverRefused, match="missing: name"):
        Registry().register(Nameless)
    with pytest.raises(DriverRefused, match="not a subclass"):
        Registry().register(object)
    reg = Registry()
    reg.load([ep("other", f"{HERE}:Fast"), ep("nostore", f"{HERE}:NoStoreKv")])
    assert not reg.drivers
    assert "'other' loads a driver named 'fast'" in reg.errors["other"]
    assert "missing: store_kv" in reg.errors["nostore"]


def test_broken_plugins_are_reported_and_skipped(tmp_path, fresh):
    (tmp_path / "llmos_test_boom.py").write_text("raise RuntimeError('boom at import')\n")
    fresh.syspath_prepend(str(tmp_path))
    broken = [ep("nostore", f"{HERE}:NoStoreKv"), ep("boom", "llmos_test_boom:Driver"),
              ep("ghost", "llmos_test_no_such_module:Driver"), ep("fast", f"{HERE}:Fast")]
    real = entry_points(group=GROUP)
    fresh.setattr(registry_mod, "entry_points", lambda group: [*broken, *real])
    errors = load_errors()
    assert "store_kv" in errors["nostore"]
    assert "RuntimeError: boom at import" in errors["boom"]
    assert "ModuleNotFoundError" in errors["ghost"]
    assert {"cpu", "sim", "fast"} <= set(current().drivers)  # the others still load
    rows = {r.name: r for r in list_drivers()}
    assert rows["boom"].load_error and not rows["boom"].available
    assert rows["fast"].available and not rows["fast"].load_error
    with pytest.raises(ValueError, match="'boom' failed to load.*boom at import"):
        get_driver("boom")
    assert get_driver("cpu").name == "cpu"


def test_register_in_process_and_auto():
    reg = Registry()
    reg.register(CpuDriver)
    assert reg.auto() == "cpu"
    reg.register(Absent)
    reg.register(current().drivers["sim"])  # priority -1: never auto
    assert reg.auto() == "cpu"
    reg.register(Fast)
    assert reg.auto() == "fast" and isinstance(reg.get("auto"), Fast)
    assert reg.register(Fast) is Fast  # the same class again is a no-op
    with pytest.raises(ValueError, match="already registered"):
        reg.register(type("Fast2", (Fast,), {}))
    rows = {r.name: r for r in reg.info()}
    assert rows["absent"].reason == "no absent accelerator on this machine"
    with pytest.raises(ValueError, match="'absent' is not available: no absent"):
        reg.get("absent")


def test_register_global_then_unregister():
    register(Fast)
    try:
        assert isinstance(get_driver("fast"), Fast)
        assert get_driver("auto").name in ("cuda", "fast")
    finally:
        unregister("fast")
    with pytest.raises(ValueError, match="unknown driver 'fast'"):
        get_driver("fast")


def test_sim_is_discovered_from_its_package():
    eps = {e.name: e for e in entry_points(group=GROUP)}
    assert "sim" in eps, "llmos-driver-sim is not installed: run `make install`"
    assert eps["sim"].dist.name == "llmos-driver-sim"  # a package of its own
    sim = get_driver("sim", memory="4M")
    assert type(sim).__module__ == "llmos_driver_sim" and sim.memory_info() == (4 << 20, 4 << 20)
    caches = sim.allocate_kv_cache(2, 16, 16, 2, 16, torch.float32)  # 128 KiB
    assert sim.memory_info() == ((4 << 20) - (128 << 10), 4 << 20)
    del caches
    assert sim.memory_info() == (4 << 20, 4 << 20)
    with pytest.raises(OutOfDeviceMemory, match="swap pool of 16.0 MiB does not fit"):
        sim.allocate_swap(2, 2048, 16, 2, 16, torch.float32)


def test_engine_on_sim_matches_cpu(checkpoint_factory):
    from llmos.kernel import Engine
    path = str(checkpoint_factory("llama"))
    outs = {}
    for name in ("cpu", "sim"):
        engine = Engine.from_pretrained(path, driver=name, num_blocks=64)
        assert engine.driver.name == name
        outs[name] = engine.generate([[5, 6, 7], [9, 3]], max_tokens=16, ignore_eos=True)
    assert [c.token_ids for c in outs["sim"]] == [c.token_ids for c in outs["cpu"]]
    assert len(outs["cpu"][0].token_ids) == 16


def test_engine_on_too_small_sim_says_so(checkpoint_factory, monkeypatch):
    from llmos.kernel import Engine
    path = str(checkpoint_factory("llama"))
    monkeypatch.setenv("LLMOS_SIM_MEMORY", "1M")
    with pytest.raises(OutOfDeviceMemory, match=r"KV cache of 64\.0 MiB does not fit: "
                                                r"capacity 1\.0 MiB.*LLMOS_SIM_MEMORY"):
        Engine.from_pretrained(path, driver="sim", kv_memory="64M")
    # Without kv_memory the pool is sized from the sim's memory_info, and fits.
    engine = Engine.from_pretrained(path, driver="sim")
    free, total = engine.driver.memory_info()
    assert total == 1 << 20 and 0 < total - free <= total // 10


def test_llmos_drivers_command_lists_cpu_and_sim():
    out = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "drivers", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {d["name"]: d for d in json.loads(out.stdout)}
    assert rows["cpu"]["available"] and rows["sim"]["available"]
    assert sum(d["auto"] for d in rows.values()) == 1
    text = subprocess.run([sys.executable, "-m", "llmos.userland.cli", "drivers"],
                          capture_output=True, text=True, timeout=60).stdout
    assert "cpu" in text and "sim" in text and "auto" in text
