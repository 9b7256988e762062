"""The scheduler (kernel/scheduler.py) on the embedded tiny model, step by step."""
from __future__ import annotations

import pytest

from llmos.kernel import Engine


@pytest.mark.parametrize("swap_blocks", [0, 8], ids=["recompute", "swap"])
def test_a_stopped_request_gives_its_kv_to_waiting_work(swap_blocks):
    """A stopped request (its process got SIGSTOP) that held most of the pool kept it:
    every request that did not fit in the rest waited until SIGCONT, and meanwhile the
    engine ran empty steps as fast as it could (41,000 in 2 s)."""
    engine = Engine.from_pretrained("tiny", num_blocks=8, num_swap_blocks=swap_blocks,
                                    poison=True)
    hog = engine.add_request([5] * 20, max_tokens=100, ignore_eos=True)
    while len(hog.seq.table.blocks) < 6:
        engine.step()
    engine.set_stopped(hog.id, True)
    late = engine.add_request([7] * 40, max_tokens=4, ignore_eos=True)    # 3 blocks, 2 free
    for _ in range(20):
        engine.step()
        if late.finished:
            break
    assert late.finished and late.finish_reason == "length"
    assert not engine.has_work()                        # only the stopped one is left
    assert engine.scheduler.num_preemptions == 1
    engine.set_stopped(hog.id, False)                   # SIGCONT: it resumes where it was
    while engine.has_work():
        engine.step()
    assert hog.finished and len(hog.output_ids) == 100
    assert engine.blocks.num_free_blocks == engine.num_blocks
    engine.blocks.check_invariants()
