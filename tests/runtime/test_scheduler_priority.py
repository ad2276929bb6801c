"""Request priority (vLLM's `priority`: lower runs first), in the scheduler and through the API."""

import pytest

from model_runtime.engine.block_manager import BlockManager
from model_runtime.engine.scheduler import Scheduler, Sequence

pytestmark = pytest.mark.runtime


def seq(name, priority=0, tokens=4):
    return Sequence(name, list(range(tokens)), tokens, max_tokens=8, priority=priority)


def test_waiting_requests_run_by_priority_then_arrival():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64)
    for name, priority in (("a", 0), ("b", 5), ("c", -1), ("d", 0)):
        s.add(seq(name, priority))
    assert [q.request_id for q in s.waiting] == ["c", "a", "d", "b"]
    assert [x.seq.request_id for x in s.schedule().scheduled] == ["c"]


def test_all_equal_priorities_are_first_come_first_served():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64)
    for name in "abcd":
        s.add(seq(name))
    assert [x.seq.request_id for x in s.schedule().scheduled] == list("abcd")


def test_the_lowest_priority_running_request_is_preempted_first():
    # 3 blocks of 4 tokens: three 4-token prompts fill them; the next decode step needs one more block
    s = Scheduler(BlockManager(3, 4), max_num_seqs=3, max_num_batched_tokens=64)
    s.add(seq("urgent", -1))
    s.add(seq("background", 9))
    s.add(seq("normal", 0))
    plan = s.schedule()
    assert sorted(x.seq.request_id for x in plan.scheduled) == ["background", "normal", "urgent"]
    for x in plan.scheduled:
        x.seq.num_computed_tokens += x.num_new_tokens
        x.seq.token_ids.append(1)   # each sampled a token: the next step needs a fifth slot
    plan = s.schedule()
    assert [v.request_id for v in plan.preempted][0] == "background"
    assert "urgent" in [x.seq.request_id for x in plan.scheduled]


def test_priority_through_the_openai_api(runtime_server):
    import httpx

    r = httpx.post(f"{runtime_server.base_url}/v1/completions",
                   json={"model": "tiny-mixtral", "prompt": "a", "max_tokens": 2, "priority": -5})
    assert r.status_code == 200, r.text
    bad = httpx.post(f"{runtime_server.base_url}/v1/completions",
                     json={"model": "tiny-mixtral", "prompt": "a", "priority": "high"})
    assert bad.status_code == 400 and "priority" in bad.text
