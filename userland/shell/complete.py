"""Tab completion in the shell: command names, then per command its options, pids and
job ids (%N), model names, subcommands, and file paths (for `run` and `!`). What the
kernel has (pids, models) comes from the status line's last snapshot: completing never
waits on the kernel.
"""
from __future__ import annotations

import re

from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

TAKES_PID = {"kill", "nice", "logs", "limit", "fg", "bg", "wait"}
TAKES_MODEL = {"--model", "-m"}
SUBCOMMANDS = {"models": ["load", "unload"]}


class ShellCompleter(Completer):
    def __init__(self, sh):
        self.sh = sh
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        from llmos.userland.shell.builtins import BUILTINS
        text = document.text_before_cursor
        if text.startswith("!"):
            yield from self._paths(text.split(" ")[-1], complete_event)
            return
        segment = re.split(r"[;&]", text)[-1].lstrip()
        words = segment.split()
        word = "" if not words or segment.endswith(" ") else words[-1]
        before = words[:-1] if word else words
        if not before:
            yield from _matching(word, sorted(BUILTINS.commands))
            return
        cmd = BUILTINS.commands.get(before[0])
        if cmd is None:
            return
        if word.startswith("-"):
            options = {o for p in cmd.params for o in p.opts + p.secondary_opts}
            yield from _matching(word, sorted(o for o in options | {"-h", "--help"}
                                              if o.startswith("-")))
        elif before[-1] in TAKES_MODEL and before[0] != "run" or (
                before[0] == "models" and len(before) == 2):
            yield from _matching(word, self._models())
        elif before[0] in SUBCOMMANDS and len(before) == 1:
            yield from _matching(word, SUBCOMMANDS[before[0]])
        elif before[0] in TAKES_PID:
            yield from _matching(word, self._targets())
        elif before[0] == "run":
            yield from self._paths(word, complete_event)

    def _targets(self) -> list[str]:
        jobs = [f"%{j.id}" for j in self.sh.jobs.jobs()]
        pids = [str(p) for p in self.sh.status_line.pids] if self.sh.status_line else []
        return jobs + pids

    def _models(self) -> list[str]:
        return list(self.sh.status_line.model_names) if self.sh.status_line else []

    def _paths(self, word: str, event) -> list[Completion]:
        """Paths that complete word; none for a word no path can be (a NUL in it)."""
        try:
            return list(self.paths.get_completions(Document(word, len(word)), event))
        except (OSError, ValueError):
            return []


def _matching(word: str, candidates) -> list[Completion]:
    return [Completion(c, start_position=-len(word)) for c in candidates if c.startswith(word)]
