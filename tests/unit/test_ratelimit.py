"""The operator's client-side rate limit (app/ratelimit.py)."""

import pytest
from moe_operator.app.ratelimit import TokenBucket, limit_api_client

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, seconds):
        self.t += seconds


def test_a_burst_goes_at_once_then_requests_are_paced_at_qps():
    clock = Clock()
    bucket = TokenBucket(qps=10, burst=5, clock=clock, sleep=clock.sleep)
    assert [bucket.acquire() for _ in range(5)] == [0.0] * 5   # the burst
    waits = [bucket.acquire() for _ in range(10)]
    assert all(w > 0 for w in waits)
    assert clock.t == pytest.approx(1.0)                        # 10 more at 10/s: one second
    clock.t += 10                                               # a quiet spell refills up to the burst
    assert [bucket.acquire() for _ in range(5)] == [0.0] * 5
    assert bucket.acquire() > 0


def test_every_call_of_the_api_client_takes_a_token():
    clock = Clock()
    calls, waits = [], []

    class Api:
        def call_api(self, *args, **kwargs):
            calls.append(args)
            return "ok"

    api = limit_api_client(Api(), TokenBucket(qps=1, burst=1, clock=clock, sleep=clock.sleep), waits.append)
    assert api.call_api("/a", "GET") == "ok" and api.call_api("/b", "GET") == "ok"
    assert calls == [("/a", "GET"), ("/b", "GET")] and waits == [pytest.approx(1.0)]
    assert TokenBucket(qps=0, burst=1).acquire() == 0.0   # 0: no limit
