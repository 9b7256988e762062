"""Engines for the KV paging and limit tests (test_vm.py, test_account.py, test_paging.py):
the embedded tiny model, or the same engine with a MarkRunner for a model; a fake clock;
and where an account's KV is, counted from the tables and images themselves."""
from __future__ import annotations

import functools
import random
import time
from pathlib import Path

from llmos.drivers.cpu import CpuDriver
from llmos.kernel import Engine
from llmos.kernel.account import Account
from llmos.kernel.blocks import BlockTable
from llmos.kernel.vm import DiskImage
from tests.kernel.stepper import Clock, MarkRunner

BLOCK = 16                      # the default block size: tokens per KV block


def tiny(**options) -> Engine:
    """The embedded tiny model, freed blocks poisoned; no host swap unless asked."""
    options.setdefault("num_swap_blocks", 0)
    options.setdefault("max_num_seqs", 8)
    return Engine.from_pretrained("tiny", poison=True, **options)


def fake_clock(engine: Engine) -> Clock:
    """One fake clock for the scheduler and the pager (the TTL compares the two)."""
    clock = Clock(time.monotonic())
    engine.scheduler.clock = engine.pager.clock = clock
    return clock


def run(engine: Engine, done, steps: int = 400) -> None:
    """Step until done(); fail if the engine runs dry first or steps run out."""
    for _ in range(steps):
        if done():
            return
        assert engine.has_work(), "the engine has nothing to do, and it is not done"
        engine.step()
    assert done(), f"not done after {steps} steps"


def turn(engine: Engine, ctx: int, prompt: list[int], acct: Account, new: int = 4):
    """One request on a context, run to its end; its output token ids."""
    req = engine.add_request(prompt, context=ctx, max_tokens=new, ignore_eos=True,
                             account=acct)
    run(engine, lambda: req.finished)
    assert req.finish_reason == "length", req.error
    return req.output_ids


def kv_of(engine: Engine, acct: Account) -> dict:
    """acct's blocks by tier, counted from the tables and images themselves."""
    kv = {"device": 0, "host": 0, "disk": 0}
    tables = [c.seq.table for c in engine.contexts.values()]
    tables += [r.seq.table for r in engine.requests.values() if r.context is None]
    kv["device"] = sum(len(t.blocks) for t in tables if t.account is acct)
    for paged in [c.paged for c in engine.contexts.values()] + \
            [r.swapped for r in engine.requests.values()]:
        if isinstance(paged, DiskImage) and paged.account is acct:
            kv["disk"] += paged.num_blocks
        elif isinstance(paged, BlockTable) and paged.account is acct:
            kv["host"] += len(paged.blocks)
    return kv


def resident(engine: Engine, ctx: int) -> bool:
    c = engine.contexts[ctx]
    return bool(c.seq.table.blocks) and c.paged is None


def paged_out(engine: Engine, ctx: int) -> bool:
    return not engine.contexts[ctx].seq.table.blocks


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 400) for _ in range(n)]


def filled(engine: Engine, acct: Account, seed: int, n: int = 40) -> int:
    """A context holding n prompt tokens and 4 generated ones (3 blocks at n=40)."""
    ctx = engine.context_create(account=acct)
    turn(engine, ctx, tokens(n, seed), acct)
    return ctx


@functools.cache
def _tiny_model():
    engine = Engine.from_pretrained("tiny", num_blocks=1, num_swap_blocks=0)
    return engine.model, engine.tokenizer


def modelless(**options) -> Engine:
    """A real Engine (scheduler, pager, pools, swap, disk tier) whose model is a
    MarkRunner: every step checks that each request attends to its own tokens' KV."""
    model, tokenizer = _tiny_model()
    engine = Engine(model, tokenizer, CpuDriver(), block_size=BLOCK, max_model_len=512,
                    poison=True, **options)
    engine.runner = MarkRunner(engine)
    return engine


def supervisor(home, engine: Engine, name: str, path, token: str, **options):
    """A Supervisor (not started) whose default model `name` is engine, made in-process
    from the checkpoint at path (its config and tokenizer are the engine's)."""
    from llmos.kernel.kernel import Supervisor
    from llmos.kernel.loader import ModelDir
    from llmos.kernel.modeltable import ModelTable
    from llmos.kernel.registry import ModelSpec, Registry
    spec = ModelSpec(name, str(path))
    registry = Registry(None)
    registry.boot(spec, ModelDir(Path(path), engine.config, engine.tokenizer))
    models = ModelTable(engine.driver)
    models.adopt(spec, engine)
    return Supervisor(home, models, registry, name, token, **options)
