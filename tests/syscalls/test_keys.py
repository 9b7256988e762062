"""The CURVE key files of a home (syscalls/keys.py): made private, read without following
symlinks, never overwritten; the allow-list as the kernel reads it."""
from __future__ import annotations

import os
import stat

import pytest
import zmq

from llmos.syscalls import keys
from llmos.syscalls.home import Home, HomeError
from llmos.syscalls.keys import KeyFileError


@pytest.fixture
def home(tmp_path):
    return Home(tmp_path / "home")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path, follow_symlinks=False).st_mode)


def test_pairs_are_private_and_never_overwritten(home):
    secret = keys.create_client(home, "laptop")
    public, secret_key = keys.client_keys(home, "laptop")
    assert zmq.curve_public(secret_key) == public
    assert (mode(home.path), mode(home.keys_dir), mode(secret.parent), mode(secret)) == (
        0o700, 0o700, 0o700, 0o600)
    assert secret.with_suffix(".pub").read_text().strip() == public.decode()
    with pytest.raises(KeyFileError, match="exists"):
        keys.create_client(home, "laptop")
    assert keys.client_keys(home, str(secret)) == (public, secret_key)
    assert sorted(os.listdir(secret.parent)) == ["laptop.key", "laptop.pub"]   # no temp left


def test_the_server_key_is_made_once_and_its_public_half_restored(home):
    with pytest.raises(KeyFileError, match="no"):
        keys.server_keys(home)
    made = keys.server_keys(home, create=True)
    (home.keys_dir / "server.pub").unlink()
    assert keys.server_keys(home, create=True) == made == keys.server_keys(home)
    assert keys.server_public(home) == made[0]


def test_allow_revoke_and_the_allow_list(home, tmp_path):
    keys.create_client(home, "laptop")
    assert keys.allow(home, "laptop") == ("laptop", True)
    assert keys.allow(home, "laptop") == ("laptop", False)
    other, _ = zmq.curve_keypair()
    cert = tmp_path / "ci.key_secret"
    cert.write_text(f'metadata\ncurve\n    public-key = "{other.decode()}"\n')
    with pytest.raises(KeyFileError, match="another key"):
        keys.allow(home, str(tmp_path / "ci.key_secret"), name="laptop")
    keys.allow(home, f"{tmp_path}/ci.key_secret", name="ci")            # a zmq certificate
    with pytest.raises(KeyFileError, match="needs a name"):
        keys.allow(home, zmq.curve_keypair()[0].decode())
    keys.allow(home, zmq.curve_keypair()[0].decode(), name="bare")
    (home.keys_dir / "allowed" / "junk.pub").write_text("not a key\n")
    listed = keys.allowed(home)
    assert sorted(listed.values()) == ["bare", "ci", "laptop"] and listed[other.decode()] == "ci"
    keys.revoke(home, "laptop")
    with pytest.raises(KeyFileError, match="no key is allowed"):
        keys.revoke(home, "laptop")
    assert "laptop" not in keys.allowed(home).values()
    kinds = [(i.kind, i.name, i.public is None) for i in keys.list_keys(home)]
    assert kinds == [("client", "laptop", False), ("allowed", "bare", False),
                     ("allowed", "ci", False), ("allowed", "junk", True)]


def test_names_are_file_names(home):
    for bad in ["../x", ".hidden", "a/b", "x.pub", "", "a" * 65]:
        with pytest.raises(KeyFileError):
            keys.create_client(home, bad)


def test_symlinks_and_foreign_modes_are_refused(home, tmp_path):
    keys.create_client(home, "laptop")
    (home.keys_dir / "allowed").symlink_to(tmp_path)
    with pytest.raises(HomeError, match="not a directory"):
        keys.allow(home, "laptop")
    (home.keys_dir / "allowed").unlink()
    secret = home.keys_dir / "clients" / "laptop.key"
    secret.rename(tmp_path / "moved.key")
    secret.symlink_to(tmp_path / "moved.key")
    with pytest.raises(HomeError, match="symlink"):
        keys.client_keys(home, "laptop")
    os.chmod(home.path, 0o777)
    with pytest.raises(HomeError, match="group or others"):
        keys.list_keys(home)


def test_zeromq_certificates_are_read(home, tmp_path):
    import zmq.auth
    public_file, secret_file = zmq.auth.create_certificates(str(tmp_path), "ci")
    public, secret = zmq.auth.load_certificate(secret_file)
    assert keys.allow(home, public_file) == ("ci", True)                  # ci.key: public
    assert keys.allowed(home) == {public.decode(): "ci"}
    assert keys.client_keys(home, secret_file) == (public, secret)       # ci.key_secret
    assert keys.public_key(secret_file) == public
