"""`llmos keys`: the CURVE keys of a home, for a kernel listening on tcp
(`llmos up --listen tcp://HOST:PORT`). Make a client key pair, list the keys, put a
client's public key on the kernel's allow-list or take it off. The kernel reads the
allow-list at every new connection: a change counts from the next one, without a
restart. The files and their layout: syscalls/keys.py.
"""
from __future__ import annotations

import dataclasses
import functools

import click

from llmos.userland import listing

HOME_HELP = "The home whose keys these are (default: $LLMOS_HOME, else ~/.llmos)."


def _keys_command(fn):
    """Add --home (as a Home) and turn a key or home problem into a one-line error."""
    @click.option("--home", default=None, help=HOME_HELP)
    @functools.wraps(fn)
    def wrapper(*args, home, **kwargs):
        from llmos.syscalls.home import Home, HomeError
        try:
            return fn(*args, home=Home(home), **kwargs)
        except HomeError as e:                  # KeyFileError included
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group()
def keys() -> None:
    """CURVE keys for a kernel listening on tcp: the kernel's, clients', the allow-list.

    On the client: `llmos keys create laptop`, then copy keys/clients/laptop.pub to the
    kernel's machine. There: `llmos keys allow laptop.pub`, `llmos up --listen
    tcp://0.0.0.0:5555`. The client then needs the kernel's keys/server.pub."""


@keys.command()
@click.argument("name")
@_keys_command
def create(name, home) -> None:
    """Make the client key pair NAME in HOME/keys/clients/ (NAME.key is secret, 0600)."""
    from llmos.syscalls import keys as k
    secret = k.create_client(home, name)
    click.echo(f"client key {name}: {secret} (secret, stays here) and "
               f"{secret.with_suffix('.pub')} (public: give it to the kernel's owner, "
               f"who runs `llmos keys allow`)")


@keys.command("list")
@listing.json_option
@_keys_command
def list_(as_json, home) -> None:
    """The kernel's key, the client key pairs kept here, and the allow-list."""
    from llmos.syscalls import keys as k
    infos = k.list_keys(home)
    click.echo(listing.to_json([dataclasses.asdict(i) for i in infos]) if as_json
               else listing.keys_text(infos))


@keys.command()
@click.argument("key")
@click.option("--name", default=None,
              help="The allow-list's name for the key (default: the pair's or the file's).")
@_keys_command
def allow(key, name, home) -> None:
    """Let the client KEY connect: a client pair's NAME here, a .pub (or ZeroMQ
    certificate) file, or a Z85 public key (with --name). Counts from its next connection."""
    from llmos.syscalls import keys as k
    name, added = k.allow(home, key, name)
    click.echo(f"allowed {name}" if added else f"{name} was allowed already")


@keys.command()
@click.argument("name")
@_keys_command
def revoke(name, home) -> None:
    """Take NAME off the allow-list: its next connection is refused (one already open
    stays until it closes; `llmos down` and `up` end it)."""
    from llmos.syscalls import keys as k
    k.revoke(home, name)
    click.echo(f"revoked {name}")


@keys.command()
@_keys_command
def server(home) -> None:
    """Print the kernel's public key (made now if this home has none: the first
    `up --listen` would make it) and where it is: every client needs it."""
    from llmos.syscalls import keys as k
    public, _ = k.server_keys(home, create=True)
    click.echo(f"{public.decode()}  {home.keys_dir / (k.SERVER + '.pub')}")
