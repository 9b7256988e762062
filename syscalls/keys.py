"""CURVE keys of a home, for a kernel that listens on TCP: its own key pair, client key
pairs, and the allow-list of client public keys it accepts. The kernel reads the
allow-list at every new TCP connection (kernel/zap.py); `llmos keys` writes it.

Layout (HOME as in syscalls/home.py):

    HOME/keys/                 0700
    HOME/keys/server.key       0600: the kernel's secret key, made by the first `up --listen`
    HOME/keys/server.pub       its public key: what every client needs ($LLMOS_SERVER_KEY)
    HOME/keys/clients/NAME.key 0600: a client's secret key (`llmos keys create NAME`)
    HOME/keys/clients/NAME.pub its public key
    HOME/keys/allowed/NAME.pub the allow-list: one client public key per file, by name

A key file is one line: the key in Z85 (40 characters). A key may also be read from a
ZeroMQ certificate (zmq.auth, czmq: NAME.key holds `public-key = "..."`, NAME.key_secret
also `secret-key = "..."`). Directories must be
ours and 0700; files are opened relative to a directory fd without following symlinks,
and written under a temporary name, then linked into place, so a reader never sees half
a key and nothing is overwritten. Raises KeyFileError (a HomeError) for a key that is
missing, malformed, or named twice.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq

from .home import Home, HomeError, open_in, private_dir, trusted_home

SERVER = "server"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")     # a file name, never a path
_Z85 = re.compile(r"[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40}\Z")
_CERT = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]{40})"', re.M)
MAX_FILE = 4096             # bytes read of a key file: a certificate is ~300


class KeyFileError(HomeError):
    """A key is missing, malformed, or its name is taken."""


@dataclass(frozen=True)
class KeyInfo:
    """One key file, as `llmos keys list` shows it: kind is "server", "client" (a pair
    kept here) or "allowed" (on the kernel's allow-list)."""
    kind: str
    name: str
    public: str | None
    path: str


def check_name(name: str) -> str:
    if not NAME.match(name) or name.endswith((".key", ".pub")):
        raise KeyFileError(f"{name!r}: a key name is letters, digits and _.@- (at most 64), "
                           f"without .key or .pub")
    return name


# ---- the kernel's key pair ---------------------------------------------------------------
def server_keys(home: Home, create: bool = False) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys of the kernel of home; create: make them if there are none
    (and server.pub again if it was lost)."""
    try:
        d = _Dir(home, (), create)
    except FileNotFoundError:
        raise KeyFileError(f"{home.keys_dir}: no keys yet") from None
    with d:
        try:
            secret = d.read(f"{SERVER}.key")
        except FileNotFoundError:
            if not create:
                raise KeyFileError(f"{home.keys_dir}: no server key yet; `llmos keys server` "
                                   f"or the first `llmos up --listen tcp://...` makes it") from None
            return d.write_pair(SERVER)
        public = zmq.curve_public(secret)
        if create:
            d.write_over(f"{SERVER}.pub", public + b"\n", 0o644)
    return public, secret


def server_public(home: Home) -> bytes:
    """The kernel's public key, as a client on its machine finds it (HOME/keys/server.pub)."""
    try:
        with _Dir(home, (), False) as d:
            return d.read_public(f"{SERVER}.pub")
    except FileNotFoundError:
        raise KeyFileError(f"{home.keys_dir / SERVER}.pub: no server key here; give the "
                           f"kernel's (server_key= or $LLMOS_SERVER_KEY)") from None


def public_key(text: str) -> bytes:
    """A Z85 public key given as itself, or as the path of a .pub, certificate or .key file."""
    if _is_key(text):
        return text.encode()
    content = _read_path(Path(text).expanduser())
    if text.endswith(".key") and not _cert(content, "public"):    # ours: a secret key
        return zmq.curve_public(_parse_secret(content, text))
    return _parse_public(content, text)


def _is_key(text: str) -> bool:
    """text is a Z85 key itself (Z85 has "/" and ".": a file of that name wins)."""
    return bool(_Z85.match(text)) and not os.path.exists(text)


def _is_path(text: str) -> bool:
    return not _is_key(text) and (os.sep in text or text.endswith((".pub", ".key")))


# ---- client key pairs --------------------------------------------------------------------
def create_client(home: Home, name: str) -> Path:
    """Make the client key pair NAME (clients/NAME.key and .pub); returns the .key path."""
    check_name(name)
    with _Dir(home, ("clients",), True) as d:
        d.write_pair(name)
        return d.path / f"{name}.key"


def client_keys(home: Home, key: str) -> tuple[bytes, bytes]:
    """(public, secret) of a client: key is a NAME in HOME/keys/clients/ or a .key file's path."""
    if _is_path(key):
        secret = _parse_secret(_read_path(Path(key).expanduser()), key)
        return zmq.curve_public(secret), secret
    check_name(key)
    try:
        with _Dir(home, ("clients",), False) as d:
            secret = d.read(f"{key}.key")
    except FileNotFoundError:
        raise KeyFileError(f"no client key {key!r} in {home.keys_dir / 'clients'} "
                           f"(`llmos keys create {key}` makes one)") from None
    return zmq.curve_public(secret), secret


# ---- the allow-list ----------------------------------------------------------------------
def allow(home: Home, key: str, name: str | None = None) -> tuple[str, bool]:
    """Put a client key on the allow-list. key: a client pair's NAME here, or a public key
    (the path of a .pub, certificate or .key file, or the Z85 key itself). name: the
    list's name for it (default: the pair's name or the file's stem; a bare key needs
    one). Returns (name, False if it was there already). Raises KeyFileError if the name
    holds another key."""
    if _is_path(key) or _is_key(key) and not (home.keys_dir / "clients" / f"{key}.key").exists():
        public = public_key(key)
        if name is None and not _is_path(key):
            raise KeyFileError("a bare public key needs a name to be allowed under")
        name = name or Path(key).name.removesuffix(".pub").removesuffix(".key")
    else:
        public, name = client_keys(home, key)[0], name or key
    check_name(name)
    with _Dir(home, ("allowed",), True) as d:
        try:
            d.write_new(f"{name}.pub", public + b"\n", 0o644)
            return name, True
        except FileExistsError:
            if d.read_public(f"{name}.pub") != public:
                raise KeyFileError(f"another key is allowed as {name!r}; revoke it first "
                                   f"or choose another name") from None
            return name, False


def revoke(home: Home, name: str) -> None:
    """Take NAME off the allow-list: its next connection is refused (open ones stay)."""
    check_name(name)
    try:
        with _Dir(home, ("allowed",), False) as d:
            os.unlink(f"{name}.pub", dir_fd=d.fd)
    except FileNotFoundError:
        raise KeyFileError(f"no key is allowed as {name!r}") from None


def allowed(home: Home) -> dict[str, str]:
    """The allow-list: Z85 public key -> name. A malformed file allows nothing."""
    keys = {}
    for info in _listed(home, "allowed", ("allowed",)):
        if info.public is not None:
            keys.setdefault(info.public, info.name)
    return keys


def list_keys(home: Home) -> list[KeyInfo]:
    """Every key of home: the server's, the client pairs kept here, the allowed keys
    (public None: the file is unreadable or malformed)."""
    return [*(i for i in _listed(home, "server", ()) if i.name == SERVER),
            *_listed(home, "client", ("clients",)), *_listed(home, "allowed", ("allowed",))]


def _listed(home: Home, kind: str, parts: tuple) -> list[KeyInfo]:
    """The NAME.pub files of HOME/keys/parts as KeyInfo of kind."""
    try:
        d = _Dir(home, parts, False)
    except FileNotFoundError:
        return []
    out = []
    with d:
        for file in sorted(f for f in os.listdir(d.fd) if f.endswith(".pub")):
            try:
                public = d.read_public(file).decode()
            except (OSError, KeyFileError):
                public = None
            out.append(KeyInfo(kind, file.removesuffix(".pub"), public, str(d.path / file)))
    return out


# ---- files -------------------------------------------------------------------------------
class _Dir:
    """HOME/keys[/part]: a checked directory fd (private_dir) for the span of a `with`."""

    def __init__(self, home: Home, parts: tuple, create: bool):
        """Raises FileNotFoundError (create=False and it is missing), HomeError (unsafe)."""
        if create:
            home.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, path = trusted_home(home), home.path
        try:
            for name in (home.keys_dir.name, *parts):
                path = path / name
                fd, parent = private_dir(fd, name, path, create), fd
                os.close(parent)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self.path = fd, path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def read(self, name: str) -> bytes:
        """The secret key in file name."""
        return _parse_secret(self._read(name), self.path / name)

    def read_public(self, name: str) -> bytes:
        return _parse_public(self._read(name), self.path / name)

    def _read(self, name: str) -> str:
        fd = open_in(self.fd, self.path / name, os.O_RDONLY, 0)
        with os.fdopen(fd, "rb") as f:
            return f.read(MAX_FILE).decode(errors="replace")

    def write_pair(self, name: str) -> tuple[bytes, bytes]:
        """A new key pair as name.key (0600) and name.pub; FileExistsError as KeyFileError."""
        public, secret = zmq.curve_keypair()
        try:
            self.write_new(f"{name}.key", secret + b"\n", 0o600)
        except FileExistsError:
            raise KeyFileError(f"{self.path / name}.key exists already") from None
        try:
            os.unlink(f"{name}.pub", dir_fd=self.fd)    # a stale .pub of a removed pair
        except FileNotFoundError:
            pass
        self.write_new(f"{name}.pub", public + b"\n", 0o644)
        return public, secret

    def write_over(self, name: str, data: bytes, mode: int) -> None:
        """Make name hold data (rewritten only if it differs)."""
        try:
            if self._read(name).encode() == data:
                return
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        self.write_new(name, data, mode)

    def write_new(self, name: str, data: bytes, mode: int) -> None:
        """Write name whole, with mode from its first byte. Raises FileExistsError."""
        tmp = f".{name}.{os.getpid()}"
        try:
            os.unlink(tmp, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        fd = open_in(self.fd, self.path / tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd, follow_symlinks=False)
        finally:
            os.unlink(tmp, dir_fd=self.fd)


def _read_path(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise KeyFileError(f"{path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_FILE).decode(errors="replace")


def _cert(text: str, half: str) -> bytes | None:
    """The public or secret key of a ZeroMQ certificate (zmq.auth, czmq), if text is one."""
    for m in _CERT.finditer(text):
        if m.group(1) == half and _Z85.match(m.group(2)):
            return m.group(2).encode()
    return None


def _parse_key(text: str, where, half: str) -> bytes:
    """The key in text: one line of Z85, or the `half` ("public" or "secret") of a ZeroMQ
    certificate. Raises KeyFileError naming where."""
    key = text.strip()
    if _Z85.match(key):
        return key.encode()
    cert = _cert(text, half)
    if cert is None:
        raise KeyFileError(f"{where}: not a {half} key (one line of 40 Z85 characters, or "
                           f"a ZeroMQ certificate with {half}-key = \"...\")")
    return cert


def _parse_secret(text: str, where) -> bytes:
    return _parse_key(text, where, "secret")


def _parse_public(text: str, where) -> bytes:
    return _parse_key(text, where, "public")
