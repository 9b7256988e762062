"""The engine loop thread: work submitted from other threads, events out, crashes fatal."""
import queue
import threading

import pytest

from llmos.kernel import Engine
from llmos.kernel.loop import EngineDead, EngineLoop

TIMEOUT = 60


@pytest.fixture
def loop(checkpoints):
    engine = Engine.from_pretrained(str(checkpoints["llama"]), num_blocks=64, poison=True)
    loop = EngineLoop(engine).start()
    yield loop
    loop.stop()


def test_requests_from_many_threads_match_in_process(loop, checkpoints):
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]
    want = Engine.from_pretrained(str(checkpoints["llama"]), num_blocks=64).generate(
        prompts, max_tokens=12, ignore_eos=True)
    results: dict[int, list] = {}

    def agent(i: int) -> None:
        events: queue.SimpleQueue = queue.SimpleQueue()
        loop.call(lambda e: e.add_request(prompts[i], max_tokens=12, ignore_eos=True,
                                          on_event=events.put), TIMEOUT)
        tokens = []
        while True:
            delta = events.get(timeout=TIMEOUT)
            tokens += delta.token_ids
            if delta.finished:
                results[i] = tokens
                return

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert [results[i] for i in range(8)] == [c.token_ids for c in want]


def test_stopped_request_waits_until_continued(loop):
    events: queue.SimpleQueue = queue.SimpleQueue()
    req = loop.call(lambda e: e.add_request([3, 4], max_tokens=40, ignore_eos=True,
                                            on_event=events.put), TIMEOUT)
    events.get(timeout=TIMEOUT)
    assert loop.call(lambda e: e.set_stopped(req.id, True), TIMEOUT)
    made = loop.call(lambda e: len(req.output_ids), TIMEOUT)
    assert loop.call(lambda e: (e.has_work(), len(req.output_ids)), TIMEOUT) == (False, made)
    loop.call(lambda e: e.set_stopped(req.id, False), TIMEOUT)
    while not events.get(timeout=TIMEOUT).finished:
        pass
    assert len(req.output_ids) == 40


def test_a_caller_error_is_theirs_and_a_crash_is_fatal(loop):
    with pytest.raises(ValueError, match="top_p"):
        loop.call(lambda e: e.add_request([3], top_p=2.0), TIMEOUT)
    crashed = threading.Event()
    loop.on_crash = lambda exc: crashed.set()

    def boom():
        raise RuntimeError("broken invariant")

    loop.call(lambda e: setattr(e, "step", boom), TIMEOUT)
    loop.submit(lambda e: e.add_request([3, 4], max_tokens=4))
    assert crashed.wait(TIMEOUT)
    with pytest.raises(EngineDead, match="broken invariant"):
        loop.call(lambda e: None, TIMEOUT)
