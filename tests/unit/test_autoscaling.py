"""The autoscaler's decision (moe_operator.autoscaling.decision) over simulated time: pressure per metric,
hysteresis, stabilisation windows, cold start, GPU shortage, bounds, rollouts (proportions, aborted
canary, freeze), and no flapping under steady noisy load. No cluster, no I/O."""

import json
import math
import random

import pytest
from moe_operator.api.spec import ModelDeployment
from moe_operator.api.timestamps import iso
from moe_operator.autoscaling import decision as a
from moe_operator.autoscaling.decision import Capacity, RolloutView, Settings, Signal, decide
from moe_operator.rollout.layout import canary_groups_for
from moe_operator.world.observe import observed_from

pytestmark = pytest.mark.unit

T0 = 1_800_000_000.0


def settings(**kw):
    base = dict(min_replicas=1, max_replicas=8, metric="requestsWaiting", target=2.0, scale_up_window=0.0,
                scale_down_window=60.0, interval=5.0, tolerance=0.1, cold_start_allowance=300.0)
    base.update(kw)
    return Settings(**base)


def queue_signal(clients, groups, slots, metric="requestsWaiting"):
    """Closed-loop load: `clients` requests always in the system, each group runs `slots` at once."""
    running = min(clients, groups * slots)
    waiting = clients - running
    saturated = slots if waiting > 0 else None
    return Signal(metric, value=waiting / groups if groups else None, groups=groups, running=running,
                  waiting=waiting, saturated_slots=saturated)


class Loop:
    """The autoscaler in a loop with a cluster that makes new groups ready after `load_seconds`
    (scheduled at once unless `gpu_groups` caps how many groups fit)."""

    def __init__(self, s, replicas=1, load_seconds=0.0, gpu_groups=None, rollout=None):
        self.s, self.replicas, self.load_seconds, self.gpu_groups = s, replicas, load_seconds, gpu_groups
        self.now, self.state, self.rollout = T0, {}, rollout or RolloutView()
        self.groups = [T0 - 3600.0] * replicas       # creation time of each existing group
        self.history = [replicas]
        self.decisions = []

    def capacity(self):
        fits = len(self.groups) if self.gpu_groups is None else min(len(self.groups), self.gpu_groups)
        placed = self.groups[:fits]
        ready = sum(self.now - t >= self.load_seconds for t in placed)
        loading = len(placed) - ready
        pending = len(self.groups) - fits
        return Capacity(current=self.replicas, ready=ready, loading=loading, pending=pending,
                        pending_reason=a.INSUFFICIENT_GPU if pending else None,
                        pending_message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu." if pending else "")

    def step(self, signal_of):
        cap = self.capacity()
        d = decide(self.s, signal_of(cap.ready), cap, self.state, self.now, self.rollout)
        # The state goes through status (JSON) between decisions.
        self.state = json.loads(json.dumps(d.state))
        self.decisions.append(d)
        if d.desired > self.replicas:
            self.groups += [self.now] * (d.desired - self.replicas)
        elif d.desired < self.replicas:
            # Unready groups go first (as the plan removes them).
            self.groups.sort(key=lambda t: (self.now - t >= self.load_seconds), )
            self.groups = self.groups[self.replicas - d.desired:]
        self.replicas = d.desired
        self.history.append(d.desired)
        self.now += self.s.interval
        return d

    def run(self, seconds, signal_of):
        for _ in range(int(seconds / self.s.interval)):
            self.step(signal_of)
        return self

    def changes(self, since=0):
        h = self.history[since:]
        return sum(1 for x, y in zip(h, h[1:], strict=False) if x != y)


# --- pressure and recommendation -----------------------------------------------------------------

def test_queue_model_scales_to_the_fewest_groups_that_keep_the_queue_at_target():
    s = settings(target=1.0)
    # 6 clients, 2 slots per group: 1 group has 4 waiting; 2 groups have 1 waiting each (= target).
    p, learned, _ = a.pressure(s, queue_signal(6, 1, 2), Capacity(current=1, ready=1), {})
    assert p == pytest.approx(6 / 3) and learned == {"slotsPerReplica": 2}
    assert a.recommend(s, p, 1) == 2
    # At 2 groups the same load asks for 2: no change either way.
    p2, _, _ = a.pressure(s, queue_signal(6, 2, 2), Capacity(current=2, ready=2), {"slotsPerReplica": 2})
    assert a.recommend(s, p2, 2) == 2


def test_an_empty_queue_is_not_taken_for_idle_capacity():
    """HPA's proportional rule would read 0 waiting as "scale to the minimum" and flap; the queue
    model keeps the groups the running requests need."""
    s = settings(target=1.0)
    sig = queue_signal(4, 2, 2)                  # 2 groups, both full, nobody waiting
    assert sig.value == 0
    p, _, _ = a.pressure(s, sig, Capacity(current=2, ready=2), {"slotsPerReplica": 2})
    assert a.recommend(s, p, 2) == 2
    # Truly idle: down to the minimum.
    p0, _, _ = a.pressure(s, queue_signal(0, 2, 2), Capacity(current=2, ready=2), {"slotsPerReplica": 2})
    assert p0 == 0 and a.recommend(s, p0, 2) == 0


def test_unknown_slots_err_on_the_side_of_more_groups():
    s = settings(target=4.0)
    # Never saw a queue: the running count per group is a lower bound of the slots.
    sig = Signal("requestsWaiting", value=0.0, groups=3, running=3.0, waiting=0.0)
    p, learned, _ = a.pressure(s, sig, Capacity(current=3, ready=3), {})
    assert learned == {} and p == pytest.approx(3 / (1 + 4))
    assert a.recommend(s, p, 3) == 1
    # Without a queue the estimate never asks for more groups than run.
    for running in range(0, 40):
        sig = Signal("requestsWaiting", value=0.0, groups=3, running=float(running), waiting=0.0)
        assert a.recommend(s, a.pressure(s, sig, Capacity(current=3, ready=3), {})[0], 3) <= 3


def test_hysteresis_band():
    s = settings(tolerance=0.1)
    assert a.recommend(s, 2.0, 2) == 2
    assert a.recommend(s, 2.19, 2) == 2          # within +10%
    assert a.recommend(s, 2.21, 2) == 3
    assert a.recommend(s, 1.9, 2) == 2           # 1.9 x 1.1 > 2 - 1: one group less would be >100%
    assert a.recommend(s, 0.9, 2) == 1
    assert a.recommend(s, 4.0000001, 2) == 4     # float noise does not add a group
    assert a.recommend(s, 0.5, 4, step_down_only=True) == 3


def test_kv_cache_usage_is_proportional():
    s = settings(metric="kvCacheUsage", target=0.6)
    sig = Signal("kvCacheUsage", value=0.9, total=1.8, groups=2)
    p, _, _ = a.pressure(s, sig, Capacity(current=2, ready=2), {})
    assert p == pytest.approx(3.0)
    assert a.recommend(s, p, 2) == 3


def test_promql_value_is_the_deployment_total():
    s = settings(metric="PromQL", target=10.0, query="sum(rate(x[1m]))")
    p, _, _ = a.pressure(s, Signal("PromQL", value=35.0, groups=2, source="prometheus"), Capacity(current=2), {})
    assert p == pytest.approx(3.5) and a.recommend(s, p, 2) == 4


def test_ttft_scales_up_proportionally_and_down_from_the_learned_knee():
    s = settings(metric="ttftP99", target=300.0)
    hot = Signal("ttftP99", value=900.0, groups=1, running=4.0, waiting=8.0)
    p, learned, only_one = a.pressure(s, hot, Capacity(current=1, ready=1), {})
    assert p == pytest.approx(3.0) and not only_one
    assert learned["loadPerReplicaAtTarget"] == pytest.approx(12 * 300 / 900)
    # Later, fast again with 3 groups and 9 requests: the knee (4 per group) says 3 groups stay.
    calm = Signal("ttftP99", value=120.0, groups=3, running=9.0, waiting=0.0)
    p2, _, only_one = a.pressure(s, calm, Capacity(current=3, ready=3), learned)
    assert a.recommend(s, p2, 3, only_one) == 3
    # Load gone: down.
    idle = Signal("ttftP99", value=0.0, groups=3, running=0.0, waiting=0.0)
    assert a.recommend(s, a.pressure(s, idle, Capacity(current=3, ready=3), learned)[0], 3) == 0
    # No knee learned yet: only one group at a time.
    p3, _, only_one = a.pressure(s, calm, Capacity(current=3, ready=3), {})
    assert only_one and a.recommend(s, p3, 3, only_one) == 2


def test_no_signal_holds():
    s = settings()
    d = decide(s, Signal("requestsWaiting", error="no ready group in rotation answered on /metrics"),
               Capacity(current=3, ready=0, loading=3), {}, T0)
    assert d.desired == 3 and d.reason == a.NO_SIGNAL and "no ready group" in d.message


# --- decisions over time -------------------------------------------------------------------------

def test_scales_up_under_load_and_back_to_min_after_the_window():
    s = settings(target=1.0, scale_down_window=60.0)
    loop = Loop(s, replicas=1, load_seconds=10.0)
    load = {"clients": 9}
    loop.run(60, lambda ready: queue_signal(load["clients"], ready, 2))
    assert loop.replicas == 3                    # 9 clients / (2 slots + 1 waiting)
    up = next(d for d in loop.decisions if d.reason == a.SCALE_UP)
    assert up.state["lastDecision"]["from"] == 1 and up.state["lastDecision"]["to"] == 3
    load["clients"] = 0
    stop = loop.now
    loop.run(120, lambda ready: queue_signal(load["clients"], ready, 2))
    assert loop.replicas == 1
    down = [d for d in loop.decisions if d.reason == a.SCALE_DOWN]
    assert len(down) == 1
    # Not before the scale-down window, and within one interval after it.
    when = T0 + (loop.decisions.index(down[0])) * s.interval
    assert stop + s.scale_down_window - s.interval <= when <= stop + s.scale_down_window + s.interval


def test_scale_up_window_ignores_a_short_spike():
    s = settings(target=1.0, scale_up_window=30.0)
    loop = Loop(s, replicas=1)
    t = {"n": 0}

    def spiky(ready):
        t["n"] += 1
        return queue_signal(12 if 3 <= t["n"] < 6 else 2, ready, 2)     # 15 s spike

    loop.run(120, spiky)
    assert loop.replicas == 1 and loop.changes() == 0
    assert any(d.reason == a.UP_STABILIZING for d in loop.decisions)
    # A sustained rise scales once the window has seen nothing lower.
    loop.run(60, lambda ready: queue_signal(12, ready, 2))
    assert loop.replicas == 4
    first_up = next(i for i, d in enumerate(loop.decisions) if d.reason == a.SCALE_UP)
    assert (first_up - 24) * s.interval >= 30.0 - s.interval


def test_scale_down_takes_the_highest_recommendation_of_its_window():
    s = settings(target=1.0, scale_down_window=60.0)
    loop = Loop(s, replicas=4)
    seq = iter([12, 3, 12, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    loop.run(25 * s.interval, lambda ready: queue_signal(next(seq), ready, 2))
    # 12 clients asked for 4 at t=10 s; 3 clients allow 2 (1 group's worth, plus the headroom). The
    # drop waits until that 4 has left the 60 s window.
    drops = [i for i, (x, y) in enumerate(zip(loop.history, loop.history[1:], strict=False)) if y < x]
    assert drops and drops[0] * s.interval >= 2 * s.interval + 60.0 - 1e-6
    assert loop.replicas == 2


@pytest.mark.parametrize("metric", ["requestsWaiting", "kvCacheUsage"])
def test_no_flapping_under_steady_noisy_load(metric):
    """An hour of steady load with +-10 % noise at a 5 s interval: one scale-up to the needed count,
    then no change at all."""
    rng = random.Random(7)
    s = settings(metric=metric, target=1.0 if metric == "requestsWaiting" else 0.7, scale_down_window=60.0)
    loop = Loop(s, replicas=1, load_seconds=20.0)

    def noisy(ready):
        clients = max(0, round(14 * rng.uniform(0.9, 1.1)))
        if metric == "requestsWaiting":
            return queue_signal(clients, ready, 2)
        # KV use grows with the sequences running on a group (each 8 % of a group's cache).
        running = min(clients, ready * 8)
        per_group = running / ready * 0.08 if ready else None
        return Signal(metric, value=per_group, total=per_group * ready if ready else None, groups=ready,
                      running=running, waiting=clients - running)

    loop.run(3600, noisy)
    settled = loop.history.index(loop.replicas)
    assert loop.changes(settled) == 0, loop.history
    assert loop.changes() <= 2, loop.history
    assert len(loop.state["recommendations"]) <= 8        # the windows' history stays small


def test_no_flapping_for_every_steady_load_level():
    """For each steady load, the count settles and stays (the hysteresis band is wider than the
    rounding of a group's worth)."""
    s = settings(target=2.0, scale_down_window=30.0)
    for clients in range(0, 60, 3):
        loop = Loop(s, replicas=1, load_seconds=10.0)
        loop.run(900, lambda ready, c=clients: queue_signal(c, ready, 4))
        h = loop.history[len(loop.history) // 3:]
        assert len(set(h)) == 1, (clients, loop.history)
        # ... and the settled count keeps the queue at or below the target per group.
        n = loop.replicas
        assert queue_signal(clients, n, 4).value <= 2.0 * 1.1 or n == s.max_replicas


# --- cold start ----------------------------------------------------------------------------------

def test_no_more_groups_while_new_ones_load_unless_the_signal_keeps_rising():
    s = settings(target=1.0, scale_down_window=60.0)
    loop = Loop(s, replicas=1, load_seconds=120.0)       # slow model load
    loop.run(60, lambda ready: queue_signal(9, ready, 2))
    assert loop.replicas == 3                            # one step, then it waited
    assert loop.changes() == 1
    # The load keeps rising while they load: more are added.
    loop.run(30, lambda ready: queue_signal(15, ready, 2))
    assert loop.replicas == 5
    # Steady again: nothing more until the loading groups are ready and counted.
    n = loop.replicas
    loop.run(60, lambda ready: queue_signal(15, ready, 2))
    assert loop.replicas == n


def test_groups_loading_for_any_reason_hold_scale_up_until_the_signal_rises():
    """E.g. a fresh deployment: 1 of 3 groups ready, the queue on it asks for a 4th. The loading two
    will take that load; only a further rise adds one."""
    s = settings(target=1.0)
    cap = Capacity(current=3, ready=1, loading=2)
    d = decide(s, queue_signal(12, 1, 2), cap, {}, T0)            # p = 12 / 3 = 4 > 3 x 1.1
    assert d.desired == 3 and d.reason == a.WAITING_FOR_LOADING and d.recommendation == 4
    assert "2 groups still loading" in d.message
    d = decide(s, queue_signal(13, 1, 2), cap, d.state, T0 + 5)   # 4.33: not 10 % above 4
    assert d.desired == 3 and d.reason == a.WAITING_FOR_LOADING
    d = decide(s, queue_signal(15, 1, 2), cap, d.state, T0 + 10)  # 5: rising
    assert d.desired == 5 and d.reason == a.SCALE_UP and "still rising" in d.message
    # Once nothing loads, the reference is forgotten.
    d = decide(s, queue_signal(15, 5, 2), Capacity(current=5, ready=5), d.state, T0 + 15)
    assert "coldStart" not in d.state


def test_a_group_loading_past_the_allowance_no_longer_holds_scale_up_back():
    s = settings(target=1.0, cold_start_allowance=60.0)
    pods = [_pod("chat", "r1", 0, ready=True, in_rotation=True, created=T0 - 600),
            _pod("chat", "r1", 1, ready=False, created=T0 - 30),
            _pod("chat", "r1", 2, ready=False, created=T0 - 600)]
    cap = a.capacity_of(3, observed_from(pods, [], 1), T0, cold_start_allowance=s.cold_start_allowance)
    assert (cap.ready, cap.loading, cap.pending) == (1, 1, 0)
    cap = a.capacity_of(3, observed_from(pods, [], 1), T0 + 60, cold_start_allowance=s.cold_start_allowance)
    assert cap.loading == 0
    d = decide(s, queue_signal(12, 1, 2), cap, {}, T0 + 60)
    assert d.desired == 4 and d.reason == a.SCALE_UP


# --- GPU shortage --------------------------------------------------------------------------------

def test_gpu_shortage_stops_asking_and_says_scaling_limited():
    s = settings(target=1.0)
    loop = Loop(s, replicas=1, load_seconds=10.0, gpu_groups=2)
    loop.run(120, lambda ready: queue_signal(15, ready, 2))
    # It asked for 5 once; 2 fit; it did not ask again while the rest pend.
    assert loop.history.count(5) >= 1 and max(loop.history) == 5
    last = loop.decisions[-1]
    assert last.limited[0] == a.INSUFFICIENT_GPU and "Insufficient nvidia.com/gpu" in last.limited[1]
    assert last.state["limited"]["reason"] == a.INSUFFICIENT_GPU
    assert last.state["pendingReplicas"] == 3
    # Still more load: no more groups asked for.
    loop.run(60, lambda ready: queue_signal(30, ready, 2))
    assert loop.replicas == 5 and loop.decisions[-1].reason == a.INSUFFICIENT_GPU


def test_gpu_shortage_does_not_block_scaling_down():
    s = settings(target=1.0, scale_down_window=10.0)
    cap = Capacity(current=4, ready=2, pending=2, pending_reason=a.INSUFFICIENT_GPU)
    state = {}
    for i in range(4):
        d = decide(s, queue_signal(0, 2, 2), cap, state, T0 + 5 * i)
        state = d.state
    assert d.desired == 1 and d.reason == a.SCALE_DOWN and d.limited[0] == a.TOO_FEW


def test_pending_pods_are_counted_from_the_scheduler():
    pods = [_pod("chat", "r1", 0, ready=True, in_rotation=True),
            _pod("chat", "r1", 1, ready=False, unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu."),
            _pod("chat", "r1", 2, ready=False, unschedulable="0/3 nodes are available: node(s) didn't match")]
    cap = a.capacity_of(3, observed_from(pods, [], 1), T0)
    assert (cap.ready, cap.loading, cap.pending, cap.pending_reason) == (1, 0, 2, a.INSUFFICIENT_GPU)
    cap = a.capacity_of(3, observed_from(pods[::2], [], 1), T0)
    assert cap.pending_reason == a.UNSCHEDULABLE


# --- bounds --------------------------------------------------------------------------------------

def test_bounds_apply_at_once_and_limits_are_reported():
    s = settings(min_replicas=2, max_replicas=4, scale_down_window=600.0)
    d = decide(s, queue_signal(0, 1, 2), Capacity(current=1, ready=1), {}, T0)
    assert d.desired == 2 and d.reason == a.BELOW_MIN
    d = decide(s, queue_signal(0, 6, 2), Capacity(current=6, ready=6), {}, T0)
    assert d.desired == 4 and d.reason == a.ABOVE_MAX
    d = decide(s, queue_signal(40, 2, 2), Capacity(current=2, ready=2), {}, T0)
    assert d.desired == 4 and d.limited[0] == a.TOO_MANY


# --- rollouts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight", [0, 10, 25, 50, 75, 100])
def test_stable_and_canary_follow_the_weight(weight):
    s = settings(target=1.0)
    view = RolloutView(active=True, weight=weight)
    d = decide(s, queue_signal(18, 2, 2), Capacity(current=2, ready=2), {}, T0, view)
    assert d.desired == 6
    canary, stable = canary_groups_for(weight, 6)
    assert d.split == (stable, canary) and d.state["split"] == {"stable": stable, "canary": canary}
    if 0 < weight < 100:
        assert abs(100 * canary / (canary + stable) - weight) <= 100 / 6


def test_an_aborted_canary_is_never_scaled_up():
    s = settings(target=1.0)
    status = {"stableRevision": "old", "rollout": {"revision": "new", "weight": 50,
                                                   "aborted": {"reason": "AlertFiring"}}}
    view = RolloutView.of(status)
    assert view.aborted and not view.active and view.weight is None
    d = decide(s, queue_signal(18, 2, 2), Capacity(current=2, ready=2), {}, T0, view)
    assert d.desired == 6 and d.split == (6, 0)
    # Its groups (ready but out of rotation, or loading) are neither capacity nor cold start.
    pods = [_pod("chat", "old", 0, ready=True, in_rotation=True),
            _pod("chat", "new", 0, ready=True, track="canary"),
            _pod("chat", "new", 1, ready=False, track="canary")]
    cap = a.capacity_of(2, observed_from(pods, [], 1), T0, exclude_revisions=["new"])
    assert (cap.ready, cap.loading) == (1, 0)


def test_rollout_view_from_status():
    assert RolloutView.of({}) == RolloutView()
    running = {"stableRevision": "old", "rollout": {"revision": "new", "weight": 25}}
    assert RolloutView.of(running) == RolloutView(active=True, weight=25)
    assert RolloutView.of(running, strategy="BlueGreen") == RolloutView(active=True)
    done = {"stableRevision": "new", "rollout": {"revision": "new", "completedAt": iso(T0)}}
    assert not RolloutView.of(done).active


def test_freeze_during_a_rollout_holds_the_count_follow_does_not():
    view = RolloutView(active=True, weight=50)
    cap = Capacity(current=2, ready=2)
    frozen = decide(settings(target=1.0, during_rollout="Freeze"), queue_signal(18, 2, 2), cap, {}, T0, view)
    assert frozen.desired == 2 and frozen.reason == a.FROZEN
    assert frozen.recommendation == 6               # still recommended (the windows stay warm)
    follow = decide(settings(target=1.0), queue_signal(18, 2, 2), cap, {}, T0, view)
    assert follow.desired == 6
    # Bounds still apply while frozen.
    assert decide(settings(min_replicas=3, during_rollout="Freeze"), queue_signal(0, 2, 2), cap, {}, T0,
                  view).desired == 3


def test_the_rollout_plans_the_autoscaled_count_in_proportion_within_the_gpu_budget():
    """The count the autoscaler decides is the rollout's steady-state size: the canary planner keeps
    the weight's proportion and the GPU budget grows with it, by one group's surge only."""
    from moe_operator.desired.pods import revision_of
    from moe_operator.rollout import machine as rollout
    from moe_operator.rollout.layout import gpu_budget

    body = {"apiVersion": "serving.moe.dev/v1alpha1", "kind": "ModelDeployment",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u", "generation": 2},
            "spec": {"replicas": 2, "model": {"source": "builtin:tiny-mixtral"}, "resources": {"gpus": 1},
                     "rollout": {"canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}},
                     "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "target": 1}}}
    md = ModelDeployment.from_body(body)
    new = revision_of(md)
    pods = [_pod("chat", "old", i, ready=True, in_rotation=True) for i in range(2)]
    pods += [_pod("chat", new, 0, ready=True, in_rotation=True, track="canary")]
    status = {"stableRevision": "old", "rollout": {"revision": new, "fromRevision": "old", "stepIndex": 0,
                                                   "weight": 50, "startedAt": iso(T0), "stepStartedAt": iso(T0),
                                                   "lastProgressAt": iso(T0)}}
    observed = observed_from(pods, [], 1)
    view = RolloutView.of(status)
    cap = a.capacity_of(md.replicas, observed, T0)
    d = decide(Settings.of(md.autoscaling), queue_signal(18, cap.ready, 2), cap, {}, T0, view)
    assert d.desired == 6 and d.split == (3, 3)

    # The rollout planner with the new count, against a cluster that makes every pod ready at once.
    body["spec"]["replicas"] = d.desired
    groups = {(p["metadata"]["labels"]["serving.moe.dev/revision"], i): p for i, p in enumerate(pods)}
    for i in range(30):
        scaled = ModelDeployment.from_body({**body, "status": status})
        observed = observed_from(list(groups.values()), [], 1)
        assert len(groups) <= gpu_budget(scaled) == 6 + 1      # one GPU per group
        plan = rollout.next_step(scaled, observed, new, T0 + 1 + i)
        status = {**status, "rollout": plan.rollout_state.to_json()}
        # Pods that existed are ready now; draining groups are gone by the next pass.
        groups = {(g.revision, g.replica): _pod("chat", g.revision, g.replica, in_rotation=g.in_rotation,
                                                track=g.track, ready=(g.revision, g.replica) in groups)
                  for g in plan.groups if not g.draining}
    rotating = {}
    for g in plan.groups:
        if g.in_rotation:
            rotating[g.track] = rotating.get(g.track, 0) + 1
    assert rotating == {"stable": 3, "canary": 3}


# --- state ---------------------------------------------------------------------------------------

def test_state_is_json_and_a_restart_resumes_the_windows():
    s = settings(target=1.0, scale_down_window=60.0)
    loop = Loop(s, replicas=1)
    loop.run(20, lambda ready: queue_signal(9, ready, 2))
    assert loop.replicas == 3
    # The operator restarts: the only memory is status (already JSON round-tripped by the loop).
    state = json.loads(json.dumps(loop.state))
    d = decide(s, queue_signal(0, 3, 2), Capacity(current=3, ready=3), state, loop.now)
    assert d.desired == 3 and d.reason == a.DOWN_STABILIZING      # the window remembers the 3
    assert d.state["slotsPerReplica"] == 2
    assert d.state["lastDecision"]["to"] == 3 and d.state["lastScaleTime"]


def test_history_compression_keeps_what_the_windows_need():
    rng = random.Random(3)
    s = settings(scale_up_window=20.0, scale_down_window=60.0)
    history = []
    for i in range(500):
        now = T0 + i * 2
        rec = rng.randint(1, 6)
        full = [[t, n] for t, n in history if now - t <= 60] + [[now, rec]]
        expect_up = min(n for t, n in full if now - t <= 20)
        expect_down = max(n for t, n in full if now - t <= 60)
        _, history_next = a.stabilize(s, history, rec, 3, now)
        kept = history_next
        assert min(n for t, n in kept if now - t <= 20) == expect_up
        assert max(n for t, n in kept if now - t <= 60) == expect_down
        history = kept
        assert len(history) <= 12


def test_times_that_do_not_round_evenly():
    """Stored times are rounded to the millisecond; the sample's own recommendation still counts."""
    s = settings(scale_up_window=0.0, scale_down_window=0.0)
    state = {}
    for i in range(5):
        d = decide(s, queue_signal(9, 1, 2), Capacity(current=1, ready=1), state, T0 + 0.123456789 + i * 1.0004)
        state = d.state
    assert d.desired == 3


def test_sampling_is_due_every_interval():
    s = settings(interval=5.0)
    assert a.due(s, {}, T0)
    assert not a.due(s, {"lastSampleAt": T0}, T0 + 4.0)
    assert a.due(s, {"lastSampleAt": T0}, T0 + 5.0)
    assert a.next_sample_in(s, {"lastSampleAt": T0}, T0 + 2.0) == pytest.approx(3.0)


def test_settings_of_the_typed_spec():
    md = ModelDeployment.from_body({"metadata": {"name": "chat"}, "spec": {
        "model": {"source": "builtin:tiny-mixtral"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 5, "metric": "kvCacheUsage", "target": 0.7,
                        "scaleUpStabilization": "10s", "scaleDownStabilization": "2m"}}})
    s = Settings.of(md.autoscaling)
    assert (s.min_replicas, s.max_replicas, s.metric, s.target) == (2, 5, "kvCacheUsage", 0.7)
    assert (s.scale_up_window, s.scale_down_window) == (10.0, 120.0)
    assert s.during_rollout == "Follow" and s.tolerance == 0.1 and math.isclose(s.interval, 15.0)


# --- helpers -------------------------------------------------------------------------------------

def _pod(name, revision, replica, ready=True, in_rotation=False, track="stable", unschedulable=None,
         created=T0 - 3600, rank=0):
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    return {"metadata": {"name": f"{name}-{revision}-{replica}-{rank}", "uid": f"{revision}-{replica}-{rank}",
                         "creationTimestamp": iso(created).replace(".000Z", "Z"),
                         "labels": {"serving.moe.dev/deployment": name, "serving.moe.dev/revision": revision,
                                    "serving.moe.dev/track": track, "serving.moe.dev/replica": str(replica),
                                    "serving.moe.dev/rank": str(rank),
                                    "serving.moe.dev/in-rotation": "true" if in_rotation else "false"}},
            "spec": {"containers": [{"name": "runtime", "resources": {"limits": {"nvidia.com/gpu": 1}}}]},
            "status": {"phase": "Running" if ready else "Pending", "conditions": conditions,
                       "podIP": f"127.100.0.{replica + 1}"}}


# --- the reconcile's edge ------------------------------------------------------------------------

def _md(status=None, autoscaling=True, replicas=1):
    spec = {"replicas": replicas, "model": {"source": "builtin:tiny-mixtral"}}
    if autoscaling:
        spec["autoscaling"] = {"minReplicas": 1, "maxReplicas": 4, "target": 1}
    return ModelDeployment.from_body({"metadata": {"name": "chat", "namespace": "ns"}, "spec": spec,
                                      "status": status or {}})


def test_step_samples_when_due_and_keeps_the_state_between_samples():
    calls = []

    def collect(settings, namespace, name, observed, memory):
        calls.append((namespace, name, memory))
        return queue_signal(9, 1, 2), {"a": {"ok": 1}}

    observed = observed_from([_pod("chat", "r1", 0, ready=True, in_rotation=True)], [], 1)
    assert a.step(_md(autoscaling=False), observed, T0, collect) is None
    first = a.step(_md(), observed, T0, collect)
    assert first.decision.reason == a.SCALE_UP and first.desired == 3 and first.next_in == 15.0
    assert first.state["signalMemory"] == {"a": {"ok": 1}} and calls == [("ns", "chat", None)]
    # Within the interval: no sample, the state stands.
    held = a.step(_md(status={"autoscaling": first.state}, replicas=3), observed, T0 + 5, collect)
    assert held.decision is None and held.desired == 3 and held.state == first.state
    assert held.next_in == pytest.approx(10.0) and len(calls) == 1
    later = a.step(_md(status={"autoscaling": first.state}, replicas=3), observed, T0 + 15, collect)
    assert later.decision is not None and calls[-1][2] == {"a": {"ok": 1}}


def test_step_leaves_an_aborted_canary_out_of_the_capacity():
    pods = [_pod("chat", "old", 0, ready=True, in_rotation=True), _pod("chat", "new", 0, ready=False, track="canary")]
    status = {"stableRevision": "old", "rollout": {"revision": "new", "aborted": {"reason": "AlertFiring"}}}
    s = a.step(_md(status=status), observed_from(pods, [], 1), T0,
               lambda *args: (queue_signal(0, 1, 2), {}))
    assert (s.state["readyReplicas"], s.state["loadingReplicas"]) == (1, 0)


def test_limited_condition_from_the_state():
    assert a.limited_condition({"limited": {"reason": a.INSUFFICIENT_GPU, "message": "2 groups"}}) == \
        (True, a.INSUFFICIENT_GPU, "2 groups")
    assert a.limited_condition({"desiredReplicas": 2})[:2] == (False, a.WITHIN_RANGE)
