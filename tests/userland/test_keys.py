"""`llmos keys`: create, list (columns and --json), allow, revoke and server, as the
owner of a home types them (CliRunner; no kernel needed: the kernel reads the files)."""
from __future__ import annotations

import json
import os

from click.testing import CliRunner

from llmos.syscalls import keys
from llmos.syscalls.home import Home
from llmos.userland.cli import main


def llmos_keys(home, *args: str):
    return CliRunner().invoke(main, ["keys", *args, "--home", str(home)])


def test_keys_round_trip(tmp_path):
    home = tmp_path / "home"
    made = llmos_keys(home, "create", "laptop")
    assert made.exit_code == 0 and f"{home}/keys/clients/laptop.key" in made.output
    assert "exists already" in llmos_keys(home, "create", "laptop").output
    server = llmos_keys(home, "server")
    public = keys.server_keys(Home(home))[0].decode()
    assert server.exit_code == 0 and server.output.split() == [public, f"{home}/keys/server.pub"]

    assert llmos_keys(home, "allow", "laptop").output == "allowed laptop\n"
    assert llmos_keys(home, "allow", "laptop").output == "laptop was allowed already\n"
    pub = home / "keys" / "clients" / "laptop.pub"
    assert llmos_keys(home, "allow", str(pub), "--name", "phone").output == "allowed phone\n"

    listed = llmos_keys(home, "list").output.splitlines()
    assert listed[0].split() == ["KIND", "NAME", "PUBLIC_KEY", "PATH"]
    assert [line.split()[:2] for line in listed[1:]] == [
        ["server", "server"], ["client", "laptop"], ["allowed", "laptop"], ["allowed", "phone"]]
    rows = json.loads(llmos_keys(home, "list", "--json").output)
    assert rows[0] == {"kind": "server", "name": "server", "public": public,
                       "path": f"{home}/keys/server.pub"}

    assert llmos_keys(home, "revoke", "phone").output == "revoked phone\n"
    gone = llmos_keys(home, "revoke", "phone")
    assert gone.exit_code == 1 and "no key is allowed as 'phone'" in gone.output
    assert sorted(os.listdir(home / "keys" / "allowed")) == ["laptop.pub"]


def test_bad_names_and_files_are_one_line_errors(tmp_path):
    home = tmp_path / "home"
    for args, says in [(["create", "../x"], "a key name is"),
                       (["allow", "nobody"], "no client key 'nobody'"),
                       (["allow", str(tmp_path / "missing.pub")], "No such file")]:
        result = llmos_keys(home, *args)
        assert result.exit_code == 1 and says in result.output, result.output
        assert "Traceback" not in result.output
