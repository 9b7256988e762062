"""Talking to a model from the shell: `gen TEXT` (one completion, streamed) and `chat`
(a conversation on one context the kernel keeps across turns, so each turn computes
only its new tokens).

Inside chat, a line is the user's turn, except:
    /exit          leave the chat (Ctrl-D too)
    /system TEXT   start again with this system prompt
    /reset         start again, same system prompt
    /fork          go on in a copy of the conversation (the original is kept)
    /back          drop the copy and return to where /fork was typed
    /help          this list
Ctrl-C while the model answers cancels the answer; the chat goes on.
"""
from __future__ import annotations

import time

import click

from llmos.syscalls import KernelDead, SyscallError
from llmos.userland.cmdline import INTERRUPTED, error_line
from llmos.userland.shell.foreground import stream

CHAT_HELP = """\
/exit  leave the chat     /system TEXT  new system prompt    /reset  start again
/fork  try a branch       /back         leave the branch     Ctrl-C  cancel an answer"""


HELP = {"help_option_names": ["-h", "--help"]}


def _sampling(fn):
    """The options gen and chat share."""
    fn = click.option("--temperature", "-t", default=None, type=click.FloatRange(min=0),
                      help="Sampling temperature; 0 is greedy.")(fn)
    fn = click.option("--max-tokens", "-n", default=None, type=click.IntRange(min=1),
                      help="Most tokens per answer (default: the kernel's).")(fn)
    return click.option("--model", "-m", default=None,
                        help="A model name (default: the kernel's).")(fn)


@click.command(context_settings=HELP)
@click.argument("text", nargs=-1, required=True)
@click.option("--chat", "as_chat", is_flag=True, help="Apply the model's chat template to TEXT.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence.")
@_sampling
@click.pass_obj
def gen(sh, text, as_chat, ignore_eos, model, max_tokens, temperature):
    """Stream one completion of TEXT (Ctrl-C cancels it)."""
    text = " ".join(text)
    source = {"messages": [{"role": "user", "content": text}]} if as_chat else {"prompt": text}
    start = time.perf_counter()
    done, interrupted = stream(sh, sh.k.generate(
        **source, stream=True, model=model, max_tokens=max_tokens, temperature=temperature,
        ignore_eos=ignore_eos or None))
    if interrupted:
        return INTERRUPTED
    u = done.usage
    sh.echo(f"\n[{done.finish_reason}; {u.prompt_tokens} prompt + {u.completion_tokens} "
            f"completion tokens in {time.perf_counter() - start:.2f}s]")


@click.command(context_settings=HELP)
@click.option("--system", "-s", default=None, help="The system prompt.")
@_sampling
@click.pass_obj
def chat(sh, system, model, max_tokens, temperature):
    """Talk with the model: each line is your turn, answered on one context kept across
    turns. /exit leaves; /help lists /system, /reset, /fork, /back. A turn that fails
    (the context is full, say) is told and the chat goes on; a kernel gone ends it."""
    name = model or next((m.name for m in sh.k.models() if m.default), "model")
    talk = Conversation(sh, system, model)
    if sh.lines is None:
        sh.echo(f"chat with {name} on context {talk.ctx.id}; /help for commands, /exit to leave")
    line = None
    try:
        while (line := _next_turn(sh)) not in (None, "/exit", "/quit"):
            try:
                talk.say(line, name, max_tokens, temperature)
            except KernelDead:
                raise
            except SyscallError as e:
                sh.error(f"chat: {error_line(e)}")
    finally:
        talk.close()
        if line not in (None, "/exit", "/quit"):     # ended early: a script's turns are not commands
            while _next_turn(sh) not in (None, "/exit", "/quit"):
                pass


def _next_turn(sh) -> str | None:
    """The user's next line (None: Ctrl-D or the script's end); Ctrl-C at the prompt skips."""
    while True:
        try:
            return sh.read_line("you> ").strip()
        except KeyboardInterrupt:
            continue
        except EOFError:
            return None


class Conversation:
    """The chat's contexts: the one talked on, and those /fork left behind (a stack)."""

    def __init__(self, sh, system, model):
        self.sh, self.system, self.model = sh, system, model
        self.stack = [sh.k.context(system=system, model=model)]

    @property
    def ctx(self):
        return self.stack[-1]

    def say(self, line: str, name: str, max_tokens, temperature) -> None:
        """One line of the user's: a /command, or a turn whose answer is streamed."""
        if line.startswith("/"):
            self.command(line)
            return
        if not line:
            return
        if self.sh.lines is None:
            self.sh.write(f"{name}> ")
        _, interrupted = stream(self.sh, self.ctx.generate(
            messages=[{"role": "user", "content": line}], stream=True,
            max_tokens=max_tokens, temperature=temperature))
        if not interrupted:
            self.sh.echo()

    def command(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "/system":
            self.system = rest.strip() or None
            self._restart()
            self.sh.echo(f"[new context {self.ctx.id}, system prompt {self.system!r}]")
        elif word == "/reset":
            self._restart()
            self.sh.echo(f"[new context {self.ctx.id}]")
        elif word == "/fork":
            self.stack.append(self.ctx.fork())
            self.sh.echo(f"[context {self.ctx.id}, a fork of {self.stack[-2].id}; /back returns]")
        elif word == "/back":
            if len(self.stack) == 1:
                self.sh.echo("[not in a fork]")
                return
            self.stack.pop().close()
            self.sh.echo(f"[back on context {self.ctx.id}]")
        else:
            self.sh.echo(CHAT_HELP)

    def _restart(self) -> None:
        self.close()
        self.stack = [self.sh.k.context(system=self.system, model=self.model)]

    def close(self) -> None:
        while self.stack:
            self.stack.pop().close()
