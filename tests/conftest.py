"""Fixtures shared by every test folder."""
from __future__ import annotations

import pytest

from tests.checkpoints import KINDS, make_checkpoint


@pytest.fixture
def no_agent_env(monkeypatch):
    """Behave as a program started outside the kernel (the owner's)."""
    for var in ("LLMOS_SOCKET", "LLMOS_TOKEN_FD", "LLMOS_PID", "LLMOS_HOME"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(kind, **options) -> path of a random-weight checkpoint, made once per session per options.

    Options are those of tests.checkpoints.make_checkpoint (dtype, max_shard_size, seed,
    chat_template, config overrides). Treat the directory as read-only: copy it to change it.
    """
    made = {}

    def make(kind: str, **options):
        key = (kind, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in made:
            made[key] = make_checkpoint(kind, tmp_path_factory.mktemp(f"ckpt-{kind}"), **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def checkpoints(checkpoint_factory):
    """{kind: path} for the default checkpoint of every kind (llama, qwen2, qwen3, mistral)."""
    return {kind: checkpoint_factory(kind) for kind in KINDS}
