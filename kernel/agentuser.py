"""The agent user (`llmos up --agent-user USER`): a kernel running as root starts its agents
under USER's uid and groups, so that the kernel's files (run/token, log/) and its memory
are out of their reach, while they still reach its socket.

What the option changes:

  agents       start through one `setpriv --reuid U --regid G --init-groups --pdeathsig
               KILL -- argv` (kernel/subreaper.py; setpriv changes the uid before it sets
               the death signal, which a change of uid would clear), in the kernel's
               working directory if U may enter it, else in /
  the socket   run/ becomes 0711 (searchable, not listable), kernel.sock group G and 0660
               (HomeLock.share_socket); the home gains search permission for all
  environment  the user's HOME, USER, LOGNAME and only INHERITED of the kernel's own
               (root's credentials stay out), plus what spawn passes
  unchanged    run/token 0600 and log/ 0700, both root's (an agent's log is opened by the
               kernel and passed as its stdout)

Every directory above the home must let U search it: checked at boot (a home under a
0700 /root is refused). Without the option, agents run as the kernel's uid: sysinfo says
isolation "none".
"""
from __future__ import annotations

import dataclasses
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from .subreaper import SETPRIV

# The kernel's environment variables agents under another user inherit (and LC_*).
INHERITED = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "PYTHONPATH",
                       "VIRTUAL_ENV", "TRITON_INTERPRET"})


@dataclass(frozen=True)
class AgentUser:
    name: str
    uid: int
    gid: int                    # its primary group: the socket's group
    groups: frozenset           # gid and its supplementary groups (what --init-groups gives)
    cwd: str                    # where agents start: a directory the user may enter
    home: str = "/"             # its home directory (HOME in agents' environment)

    def environ(self, ours: dict) -> dict:
        """Agents' base environment: the user's own identity and, of the kernel's (root's)
        environment, only what programs need to run: never its credentials (SUDO_*,
        cloud tokens, LLMOS_TOKEN or LLMOS_KEY a root shell exported)."""
        kept = {k: v for k, v in ours.items() if k in INHERITED or k.startswith("LC_")}
        return {**kept, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    @property
    def setpriv_opts(self) -> tuple[str, ...]:
        return ("--reuid", str(self.uid), "--regid", str(self.gid), "--init-groups")

    def blocker(self, path) -> Path | None:
        """The first existing directory from / down to path that this user may not search
        (the owner's, group's or others' x bit, as the kernel picks them; ACLs aside),
        else None. Missing directories are skipped: the kernel makes them 0755 or 0711."""
        path = Path(path).resolve()
        for d in [*reversed(path.parents), path]:
            try:
                st = os.stat(d)
            except FileNotFoundError:
                continue
            bit = (0o100 if st.st_uid == self.uid else 0o010 if st.st_gid in self.groups
                   else 0o001)
            if not st.st_mode & bit:
                return d
        return None


def lookup(name: str, home) -> AgentUser:
    """The agent user `name` for a kernel on the home path `home`. Raises ValueError (the
    kernel does not boot) unless this process runs as root, the user exists and is not
    root, setpriv is installed, and the user may reach the home."""
    if os.geteuid() != 0:
        raise ValueError(f"--agent-user {name}: only a kernel running as root can start agents "
                         f"as another user (this one runs as uid {os.geteuid()}); run "
                         f"`llmos up` as root, or without --agent-user")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--agent-user {name}: no such user") from None
    if pw.pw_uid == 0:
        raise ValueError(f"--agent-user {name}: a user of uid 0 isolates nothing; "
                         f"choose an unprivileged user (e.g. nobody)")
    if not os.access(SETPRIV, os.X_OK):
        raise ValueError(f"--agent-user needs {SETPRIV} (util-linux) to start agents as {name}")
    user = AgentUser(name, pw.pw_uid, pw.pw_gid, frozenset(os.getgrouplist(name, pw.pw_gid)),
                     "/", pw.pw_dir or "/")
    if (d := user.blocker(Path(home).parent)) is not None:
        raise ValueError(f"--agent-user {name}: {name} may not search {d}, so its agents could "
                         f"not reach the kernel's socket in {home}; choose a --home outside it")
    cwd = os.getcwd()
    return user if user.blocker(cwd) else dataclasses.replace(user, cwd=cwd)
