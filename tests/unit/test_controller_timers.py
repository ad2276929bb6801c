"""The controller's timed reconciles (pause ends, delays, analysis intervals) and rollout metrics."""

import threading

import pytest
from moe_operator.app.controller import Controller
from moe_operator.app.metrics import OperatorMetrics
from moe_operator.reconcile import Outcome
from moe_operator.rollout.progressive import Report

pytestmark = pytest.mark.unit


def test_run_after_keeps_the_earliest_timer_and_fires_once():
    controller = Controller(reader=None, writer=None, metrics=OperatorMetrics())
    fired = []
    done = threading.Event()

    def run(key):
        fired.append(key)
        done.set()

    controller.run = run
    controller.run_after(("ns", "a"), 30)
    controller.run_after(("ns", "a"), 0.05)       # earlier: replaces
    controller.run_after(("ns", "a"), 10)         # later: ignored
    assert done.wait(5)
    assert fired == [("ns", "a")]
    assert controller._timers == {}


def test_rollbacks_and_durations_are_recorded():
    metrics = OperatorMetrics()
    controller = Controller(reader=None, writer=None, metrics=metrics)
    controller._record(Outcome(report=Report(rollback=("AlertFiring", 0.25), completed=("Canary", 42.0))))
    value = metrics.registry.get_sample_value
    assert value("moe_operator_rollbacks_total", {"reason": "AlertFiring"}) == 1
    assert value("moe_operator_rollback_latency_seconds_count") == 1
    assert value("moe_operator_rollback_latency_seconds_sum") == 0.25
    assert value("moe_operator_rollout_duration_seconds_count", {"strategy": "Canary"}) == 1


def test_thousands_of_timers_cost_no_thread_each_and_all_fire():
    """A delaying queue (controller-runtime's), not a thread per timer: 2,000 ModelDeployments waiting
    on a pause or a retry must not mean 2,000 sleeping threads that then all reconcile at once."""
    controller = Controller(reader=None, writer=None, metrics=OperatorMetrics())
    fired, lock, done = [], threading.Lock(), threading.Event()

    def run(key):
        with lock:
            fired.append(key)
            if len(fired) == 2000:
                done.set()

    controller.run = run
    before = threading.active_count()
    for i in range(2000):
        controller.run_after(("ns", f"m{i}"), 0.2 + (i % 10) * 0.01)
    assert threading.active_count() <= before + 1          # the one thread that waits for the earliest
    assert done.wait(10)
    assert sorted(fired) == sorted(("ns", f"m{i}") for i in range(2000))
    assert controller._timers == {} and threading.active_count() <= before + 1 + 16
