"""`llmos serve`: an OpenAI-compatible HTTP gateway to the kernel, so that code written
for the OpenAI API (the `openai` client, LangChain, anything that takes a base URL) runs
on llmos unchanged:

    llmos serve                       # http://127.0.0.1:8000/v1, no key (loopback only)
    llmos serve --host 0.0.0.0 --api-keys keys.txt

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "add 12 47"}])

The gateway is a userland program: it reaches the kernel through the SDK, and each API
key is a process of the kernel (userland/gateway/clients.py).
"""
from __future__ import annotations

import click

from llmos.syscalls.net import is_loopback
from llmos.userland.cmdline import HOME_HELP


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs API keys.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port to listen on.")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="A key clients send as `Authorization: Bearer KEY` (repeatable); "
                   "each key is a process of its own (api:key1, ...).")
@click.option("--api-keys", "key_file", type=click.Path(exists=True, dir_okay=False),
              help="A file of `NAME KEY` lines: key NAME's requests are process api:NAME.")
@click.option("--home", default=None, help=HOME_HELP)
def serve(host, port, api_keys, key_file, home) -> None:
    """Serve the OpenAI API (chat/completions, completions, models), /health and /metrics
    for the kernel of --home, until Ctrl-C."""
    import uvicorn

    from llmos.userland.gateway.app import make_app
    from llmos.userland.gateway.clients import Clients, read_keys
    try:
        keys = read_keys(api_keys, key_file)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if not keys and not is_loopback(host):
        raise click.ClickException(f"--host {host} is not loopback: give --api-key or "
                                   f"--api-keys, or anyone who can reach it may use the kernel")
    app = make_app(Clients(home, keys))
    click.echo(f"llmos serve: http://{host}:{port}/v1 ({len(keys) or 'no'} API key"
               f"{'s' * (len(keys) != 1)})", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
