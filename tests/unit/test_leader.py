"""Leader election on a Lease (app/leader.py) against an in-memory Lease API that enforces
resourceVersion preconditions as the API server does."""

import copy

import pytest
from kubernetes.client.exceptions import ApiException
from moe_operator.app.leader import LeaderElector

pytestmark = pytest.mark.unit


class FakeLeases:
    def __init__(self):
        self.lease = None
        self.version = 0
        self.down = False

    def _check(self):
        if self.down:
            raise ApiException(status=503, reason="Service Unavailable")

    def read_namespaced_lease(self, name, namespace):
        self._check()
        if self.lease is None:
            raise ApiException(status=404, reason="Not Found")
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace, body):
        self._check()
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = copy.deepcopy(body)
        return body

    def replace_namespaced_lease(self, name, namespace, body):
        self._check()
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise ApiException(status=409, reason="Conflict")
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = copy.deepcopy(body)
        return body


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def elector(api, name, clock):
    return LeaderElector(api, "moe-system", identity=name, lease_duration=10, renew_deadline=7, retry_period=2,
                         clock=clock)


def test_one_candidate_leads_and_the_other_takes_over_only_after_the_lease_expires():
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    assert a.try_acquire_or_renew() is True          # creates the Lease
    assert b.try_acquire_or_renew() is False         # a holds it
    clock.t += 5
    assert a.try_acquire_or_renew() is True          # renews
    assert b.try_acquire_or_renew() is False
    clock.t += 9                                     # a stops renewing (partitioned, killed)
    assert b.try_acquire_or_renew() is False         # 9 s since the record last changed: not yet
    clock.t += 2
    assert b.try_acquire_or_renew() is True          # 11 s > 10 s lease duration: b takes it
    assert api.lease.spec.holder_identity == "b" and api.lease.spec.lease_transitions == 1
    assert a.try_acquire_or_renew() is False         # a, back, finds b holding a fresh lease


def test_of_two_candidates_racing_for_an_expired_lease_only_one_wins():
    api, clock = FakeLeases(), Clock()
    a, b, c = elector(api, "a", clock), elector(api, "b", clock), elector(api, "c", clock)
    a.try_acquire_or_renew()
    b.try_acquire_or_renew(), c.try_acquire_or_renew()   # both see a's record
    clock.t += 11
    stale = copy.deepcopy(api.lease)
    assert b.try_acquire_or_renew() is True
    # c read the Lease before b's update landed: its update carries the old resourceVersion
    api_read = api.read_namespaced_lease
    api.read_namespaced_lease = lambda name, namespace: copy.deepcopy(stale)
    assert c.try_acquire_or_renew() is False
    api.read_namespaced_lease = api_read
    assert api.lease.spec.holder_identity == "b"


def test_a_released_lease_is_taken_at_once():
    api, clock = FakeLeases(), Clock()
    a, b = elector(api, "a", clock), elector(api, "b", clock)
    a.try_acquire_or_renew()
    a._leading.set()
    b.try_acquire_or_renew()
    a.release()
    assert api.lease.spec.holder_identity is None
    assert b.try_acquire_or_renew() is True          # no need to wait for expiry


def test_a_leader_that_cannot_renew_for_the_deadline_stops_leading():
    api, clock = FakeLeases(), Clock()
    lost = []
    a = elector(api, "a", clock)
    a.on_lost = lambda: lost.append(True)
    a._stop.wait = lambda timeout: (setattr(clock, "t", clock.t + timeout), False)[1]   # time passes per wait
    assert a.try_acquire_or_renew()
    a._leading.set()
    api.down = True
    a.run()                                           # renews fail for > 7 s: returns, leadership lost
    assert lost == [True] and not a.leading
    assert clock.t >= 7
