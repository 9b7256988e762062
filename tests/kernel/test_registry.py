"""The model registry: names, HOME/models.toml, what model= may name and who may name paths."""
from __future__ import annotations

import shutil

import pytest

from llmos.kernel.registry import Registry
from llmos.syscalls.errors import SyscallError


def test_names_survive_a_new_registry_whatever_their_paths_hold(tmp_path, checkpoints):
    odd = tmp_path / 'mödel 😀 "q" \\ x'
    shutil.copytree(checkpoints["llama"], odd)
    reg = Registry(tmp_path)
    reg.add("odd", str(odd), dtype="bfloat16", quantize="int8", keep_alive=-1)
    reg.add("plain", str(checkpoints["llama"]))
    again = Registry(tmp_path)                                   # read back from the file
    assert again.resolve("odd") == reg.resolve("odd")
    assert (again.resolve("odd").path, again.resolve("odd").dtype) == (str(odd), "bfloat16")
    assert [s.name for s in again.registered()] == ["odd", "plain"]
    again.remove("odd")
    assert [s.name for s in Registry(tmp_path).registered()] == ["plain"]


@pytest.mark.parametrize("name, path, options, code", [
    ("tiny", "llama", {}, "EINVAL"),               # the embedded model's name is taken
    ("a/b", "llama", {}, "EINVAL"),                # a name is not a path
    ("ok", "llama", {"dtype": "int4"}, "EINVAL"),
    ("ok", "llama", {"quantize": "q4"}, "EINVAL"),
    ("ok", "nowhere", {}, "EINVAL"),               # a model that cannot be opened
    ("dup", "llama", {}, "EEXIST"),
])
def test_a_bad_registration_is_refused_and_changes_nothing(tmp_path, checkpoints, name, path,
                                                           options, code):
    reg = Registry(tmp_path)
    reg.add("dup", str(checkpoints["llama"]))
    where = str(checkpoints["llama"]) if path == "llama" else str(tmp_path / path)
    with pytest.raises(SyscallError) as err:
        reg.add(name, where, **options)
    assert err.value.code == code
    assert [s.name for s in Registry(tmp_path).registered()] == ["dup"]


def test_a_broken_registry_file_is_ignored_not_fatal(tmp_path, caplog):
    (tmp_path / "models.toml").write_text("[models.x\npath = ")
    assert Registry(tmp_path).registered() == []
    assert "not a model registry" in caplog.text


def test_resolve_knows_names_paths_and_who_may_name_a_path(tmp_path, checkpoints):
    reg = Registry(tmp_path)
    assert reg.resolve("tiny").name == "tiny"
    path = str(checkpoints["llama"])
    assert reg.resolve(path).path == path
    with pytest.raises(SyscallError) as err:
        reg.resolve(path, paths=False)
    assert err.value.code == "EPERM"
    with pytest.raises(SyscallError) as err:
        reg.resolve("nope")
    assert err.value.code == "ENOENT" and "tiny" in err.value.msg


def test_an_agent_learns_nothing_of_the_file_system_from_a_path(tmp_path):
    reg = Registry(tmp_path)
    for path in ("/etc/passwd", "/etc/no-such-file", "~nosuchuser/m", "x.gguf"):
        with pytest.raises(SyscallError) as err:
            reg.resolve(path, paths=False)
        assert err.value.code == "EPERM", path          # the same answer whether it exists


def test_a_bad_entry_is_skipped_and_an_unparsable_file_is_never_overwritten(tmp_path, checkpoints,
                                                                              caplog):
    path = str(checkpoints["llama"])
    (tmp_path / "models.toml").write_text(
        f'[models.good]\npath = "{path}"\n[models.bad]\npath = "{path}"\nkeep_alive = nan\n'
        f'[models.odd]\npath = "{path}"\ndtype = "int4"\n')
    assert [s.name for s in Registry(tmp_path).registered()] == ["good"]
    assert "model 'bad' ignored" in caplog.text and "model 'odd' ignored" in caplog.text
    broken = "[models.x\npath = "
    (tmp_path / "models.toml").write_text(broken)
    reg = Registry(tmp_path)
    for change in (lambda: reg.add("new", path), lambda: reg.remove("x")):
        with pytest.raises(SyscallError) as err:
            change()
        assert err.value.code == "EINVAL" and "does not parse" in err.value.msg
    assert (tmp_path / "models.toml").read_text() == broken


def test_a_registration_that_cannot_be_written_is_not_kept(tmp_path, checkpoints):
    reg = Registry(tmp_path)
    (tmp_path / "models.tmp").mkdir()                  # the atomic write's temporary: blocked
    with pytest.raises(SyscallError) as err:
        reg.add("m", str(checkpoints["llama"]))
    assert err.value.code == "EIO"
    assert reg.registered() == [] and not (tmp_path / "models.toml").exists()
    with pytest.raises(SyscallError) as err:
        reg.add("m", "~nosuchuser/model")
    assert err.value.code == "EINVAL"
