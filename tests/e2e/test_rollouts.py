"""Rollouts end to end: the real operator, API server, scheduler, kwok GPU nodes, Prometheus,
Alertmanager and (for the analysis paths) real runtime pods on the local node under bounded load.

Simulated (kwok) pods are ready at once and serve nothing: they exercise the state machine, the GPU
budget, the webhook and restarts cheaply. Runtime pods on the local node serve real traffic: they
exercise the alert path (Prometheus rule -> Alertmanager -> /alerts) and the built-in scrape.
"""

import json
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from moe_operator.api import names
from moe_operator.api.timestamps import epoch, iso
from moe_operator.rollout.requests import ANNOTATION_ABORT, ANNOTATION_PROMOTE, AbortRequest

from devtools.harness import running_operator, wait_for
from devtools.loadgen import Load, service_port

pytestmark = pytest.mark.e2e

SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}
LOCAL = {"devcluster.serving.moe.dev/local": "true"}


def md(name, ns, replicas=4, gpus=1, surge=1, steps=None, analysis=None, strategy="Canary", env="0",
       node=SIMULATED, **rollout_extra):
    ro = {"strategy": strategy, "maxSurgeGPUs": surge, "analysis": analysis or {"slo": {}}, **rollout_extra}
    if strategy == "Canary":
        ro["canary"] = {"steps": steps if steps is not None else [{"setWeight": 50}, {"pause": {}}]}
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": replicas, "model": {"source": "builtin:tiny-deepseek-v3", "dtype": "float32"},
                     "runtime": {"env": [{"name": "ROLLOUT_TEST", "value": env}]},
                     "resources": {"gpus": gpus}, "scheduling": {"nodeSelector": node}, "rollout": ro}}


def get(cluster, *args):
    return json.loads(cluster.kubectl("get", "-o", "json", *args).stdout)


def status(cluster, ns, name):
    return get(cluster, "md", name, "-n", ns).get("status") or {}


def live_pods(cluster, ns, name):
    items = get(cluster, "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={name}")["items"]
    return items


def stable_revision(cluster, ns, name, replicas):
    return wait_for("the first revision to be stable", lambda: (lambda s: s.get("stableRevision")
                    if s.get("readyReplicas") == replicas and s.get("currentRevision") == s.get("stableRevision")
                    else None)(status(cluster, ns, name)), 180, 0.2)


def holds(what, check, seconds, interval=0.2):
    """Assert `check()` stays true for `seconds` (an observation window, polled)."""
    deadline = time.monotonic() + seconds
    while True:
        assert check(), what
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def promote(cluster, ns, name):
    cluster.kubectl("annotate", "md", name, "-n", ns, "--overwrite",
                    f"{ANNOTATION_PROMOTE}={iso(time.time())}")


def post(op, token, body: bytes):
    request = urllib.request.Request(f"http://127.0.0.1:{op.port}/alerts", data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(
                                         {"Authorization": token} if token else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def user_annotations(obj):
    """The annotations users and the webhook write (kopf's last-handled-configuration left out)."""
    return {k: v for k, v in (obj["metadata"].get("annotations") or {}).items()
            if not k.endswith("/last-handled-configuration")}


def alert_payload(ns, name, revision=None, status="firing"):
    labels = {"alertname": "MoECanaryLatencyHigh", "namespace": ns, "modeldeployment": name}
    if revision:
        labels["revision"] = revision
    return json.dumps({"version": "4", "status": status, "receiver": "moe", "groupKey": "{}:{}",
                       "alerts": [{"status": status, "labels": labels, "annotations": {"summary": "slow"},
                                   "startsAt": "2026-01-01T00:00:00Z"}]}).encode()


class Background:
    """A daemon thread running `self._run` for the length of a `with` block; `_run` checks
    `self._stop` and ends within `join_seconds` of it being set."""

    join_seconds = 10

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(self.join_seconds)


class BudgetWatch(Background):
    """Lists the ModelDeployment's pods continuously and checks every list against the GPU budget."""

    def __init__(self, cluster, ns, name, budget, gpus_per_pod):
        from kubernetes import client, config
        self.core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
        self.ns, self.name, self.budget, self.gpus = ns, name, budget, gpus_per_pod
        self.lists, self.max_seen, self.violations, self.errors = 0, 0, [], 0
        super().__init__()

    def _run(self):
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                pods = self.core.list_namespaced_pod(
                    self.ns, label_selector=f"{names.LABEL_DEPLOYMENT}={self.name}", _request_timeout=30).items
            except Exception:      # a slow or failed list checks nothing; the next one does
                self.errors += 1
                self._stop.wait(0.2)
                continue
            used = sum(self.gpus for p in pods if p.status.phase not in ("Succeeded", "Failed"))
            self.lists += 1
            self.max_seen = max(self.max_seen, used)
            if used > self.budget:
                self.violations.append((used, sorted(p.metadata.name for p in pods)))
            self._stop.wait(0.05)


class StatusHistory(Background):
    """Watches one ModelDeployment and keeps every status the API server stored (a watch sees each
    write, where polling can miss one that lasts a few milliseconds)."""

    join_seconds = 40      # a watch request returns within its 5 s timeout

    def __init__(self, cluster, ns, name):
        from kubernetes import client, config
        self.api = client.CustomObjectsApi(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
        self.ns, self.name = ns, name
        self.statuses: list[dict] = []
        super().__init__()

    def _run(self):
        from kubernetes import watch
        group, version = names.API_VERSION.split("/")
        deadline = time.monotonic() + 600
        resource_version = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            w = watch.Watch()
            try:
                for event in w.stream(self.api.list_namespaced_custom_object, group, version, self.ns,
                                      names.PLURAL, field_selector=f"metadata.name={self.name}",
                                      resource_version=resource_version, timeout_seconds=5,
                                      _request_timeout=30):
                    obj = event["object"]
                    resource_version = obj["metadata"]["resourceVersion"]
                    self.statuses.append(obj.get("status") or {})
                    if self._stop.is_set():
                        break
            except Exception:      # an expired resourceVersion or a dropped stream: list again
                resource_version = None
                self._stop.wait(0.1)
            finally:
                w.stop()


# --- simulated pods: state machine, budget, webhook, restarts ------------------------------------

def test_good_revision_goes_through_every_step_to_promoted_within_the_gpu_budget(cluster, ns, operator):
    name = "steps"
    steps = [{"setWeight": 25}, {"pause": {"duration": "2s"}}, {"setWeight": 50}, {"pause": {"duration": "2s"}},
             {"setWeight": 75}]
    cluster.apply(md(name, ns, replicas=4, gpus=2, surge=2, steps=steps))
    stable = stable_revision(cluster, ns, name, 4)
    with BudgetWatch(cluster, ns, name, budget=4 * 2 + 2, gpus_per_pod=2) as watch, \
            StatusHistory(cluster, ns, name) as history:
        cluster.apply(md(name, ns, replicas=4, gpus=2, surge=2, steps=steps, env="1"))
        new = wait_for("the new revision to be promoted", lambda: (lambda s: s.get("stableRevision")
                       if s.get("stableRevision") not in (None, stable) else None)(status(cluster, ns, name)),
                       180, 0.1)
        canary_uids = {p["metadata"]["uid"] for p in live_pods(cluster, ns, name)
                       if p["metadata"]["labels"][names.LABEL_REVISION] == new}
        wait_for("the old revision to go", lambda: all(
            p["metadata"]["labels"][names.LABEL_REVISION] == new for p in live_pods(cluster, ns, name)), 120, 0.2)
    assert watch.violations == [] and watch.lists > 20, (watch.violations[:3], watch.lists)
    assert watch.max_seen <= 10
    seen = []
    for s in history.statuses:
        state = s.get("rollout") or {}
        if state.get("revision") and state.get("revision") != stable:
            point = (state.get("stepIndex"), s.get("canaryWeight"))
            if not seen or seen[-1] != point:
                seen.append(point)
    # Every step was visited in order (weights as groups: 25% = 1 of 4, 50% = 2, 75% = 3).
    steps_seen = [i for i, _ in seen if i is not None]
    assert steps_seen == sorted(steps_seen) and {1, 3}.issubset(steps_seen), seen
    weights = [w for _, w in seen if w is not None]
    assert {25, 50, 75}.issubset(weights), seen
    final = live_pods(cluster, ns, name)
    assert {p["metadata"]["labels"][names.LABEL_TRACK] for p in final} == {"stable"}
    assert {p["metadata"]["uid"] for p in final} == canary_uids, "promotion relabels, it does not restart"
    conds = {c["type"]: c["reason"] for c in status(cluster, ns, name)["conditions"]}
    assert conds["Available"] == "AllReplicasReady"


def test_webhook_refuses_bad_tokens_and_payloads_without_effect_then_aborts(cluster, ns, operator, token):
    name = "hook"
    cluster.apply(md(name, ns, replicas=2))
    stable = stable_revision(cluster, ns, name, 2)
    cluster.apply(md(name, ns, replicas=2, env="1"))
    new = wait_for("the canary in rotation", lambda: (lambda s: s.get("currentRevision")
                   if s.get("canaryWeight") == 50 else None)(status(cluster, ns, name)), 120, 0.2)
    before = get(cluster, "md", name, "-n", ns)
    good = f"Bearer {token[0]}"
    assert post(operator, None, alert_payload(ns, name))[0] == 401
    assert post(operator, "Bearer wrong", alert_payload(ns, name))[0] == 401
    assert post(operator, f"Basic {token[0]}", alert_payload(ns, name))[0] == 401
    code, body = post(operator, good, b'{"alerts": "no"}')
    assert code == 400 and "alerts must be a list" in body["error"]
    assert post(operator, good, b"not json")[0] == 400
    after = get(cluster, "md", name, "-n", ns)
    assert after["metadata"].get("annotations", {}).get(ANNOTATION_ABORT) is None
    # The refused posts wrote nothing (kopf's own bookkeeping of the spec change it handled may land
    # meanwhile: it is not the webhook's doing).
    assert user_annotations(after) == user_annotations(before)
    assert (after.get("status") or {}).get("rollout", {}).get("handled") == \
        (before.get("status") or {}).get("rollout", {}).get("handled")
    assert status(cluster, ns, name).get("canaryWeight") == 50
    # A resolved alert, and one naming another revision, do nothing either.
    assert post(operator, good, alert_payload(ns, name, status="resolved"))[0] == 200
    code, body = post(operator, good, alert_payload(ns, name, revision=stable))
    assert code == 200 and body["aborted"] == []
    # The real thing.
    code, body = post(operator, good, alert_payload(ns, name, revision=new))
    assert code == 200 and body["aborted"][0]["revision"] == new
    state = wait_for("the abort", lambda: (status(cluster, ns, name).get("rollout") or {}).get("outOfRotationAt")
                     and status(cluster, ns, name)["rollout"], 30, 0.05)
    assert state["aborted"]["reason"] == "AlertFiring"
    assert not any(p["metadata"]["labels"][names.LABEL_IN_ROTATION] == "true"
                   for p in live_pods(cluster, ns, name) if p["metadata"]["labels"][names.LABEL_REVISION] == new)
    conds = {c["type"]: (c["status"], c["reason"]) for c in status(cluster, ns, name)["conditions"]}
    assert conds["Degraded"] == ("True", "RolloutAborted")
    assert operator.metric("moe_operator_rollbacks_total", reason="AlertFiring") >= 1
    assert operator.metric("moe_operator_rollback_latency_seconds_count") >= 1
    # Repeats are harmless.
    assert post(operator, good, alert_payload(ns, name, revision=new))[1]["aborted"] == []


def test_promql_with_no_data_never_passes(cluster, ns, operator):
    name = "promql"
    analysis = {"interval": "1s", "slo": {"p99LatencyMs": 500},
                "prometheus": {"url": cluster.prometheus_url}}
    cluster.apply(md(name, ns, replicas=2, steps=[{"setWeight": 50}], analysis=analysis))
    stable = stable_revision(cluster, ns, name, 2)
    cluster.apply(md(name, ns, replicas=2, steps=[{"setWeight": 50}], analysis=analysis, env="1"))
    state = wait_for("the rollout to pause on inconclusive analysis", lambda: (lambda s: s
                     if (s.get("paused") or {}).get("reason") == "AnalysisInconclusive" else None)(
        status(cluster, ns, name).get("rollout") or {}), 120, 0.3)
    assert "no data" in state["paused"]["message"] or "fewer than" in state["paused"]["message"]
    # A window (several analysis intervals) in which a wrong implementation would promote.
    holds("the stable revision unchanged while the analysis has no data",
          lambda: status(cluster, ns, name).get("stableRevision") == stable, 4, 0.3)
    s = status(cluster, ns, name)
    assert s["stableRevision"] == stable
    measurements = s["rollout"]["analysis"]["measurements"]
    assert measurements and all(m["result"] == "inconclusive" for m in measurements)


def operator_alone(cluster, ns, sole_operator, token, resync_seconds):
    """running_operator for a namespace no other operator process watches (checked before it starts)."""
    sole_operator(ns)
    return running_operator(cluster, namespaces=[ns], resync_seconds=resync_seconds,
                            extra_args=("--alerts-token-file", str(token[1])))


def sigkill(op, sole_operator, ns):
    """SIGKILL the operator, reap it, and check no operator process is left watching ns."""
    op.process.kill()
    op.process.wait(30)
    sole_operator(ns)


def test_operator_killed_mid_rollout_resumes(cluster, own_namespace, token, sole_operator):
    # Its own namespace: the module's operator (watching `ns`) must not move this rollout on while
    # the test's operator is dead.
    ns, name = own_namespace, "restart"
    pause = 6       # long enough that the kill surely lands inside it, even on a loaded machine
    steps = [{"setWeight": 50}, {"pause": {"duration": f"{pause}s"}}, {"setWeight": 75}, {"pause": {}}]
    with operator_alone(cluster, ns, sole_operator, token, 2.0) as op:
        cluster.apply(md(name, ns, replicas=4, steps=steps, surge=2))
        stable = stable_revision(cluster, ns, name, 4)
        cluster.apply(md(name, ns, replicas=4, steps=steps, surge=2, env="1"))
        state = wait_for("the pause step", lambda: (lambda s: s if s.get("stepIndex") == 1 else None)(
            status(cluster, ns, name).get("rollout") or {}), 120, 0.1)
        sigkill(op, sole_operator, ns)                       # SIGKILL in the middle of a timed pause
    # The pause ends while no operator runs (nothing may move meanwhile).
    pause_end = epoch(state["stepStartedAt"]) + pause
    wait_for("the pause to end with no operator running", lambda: time.time() > pause_end + 1, 60, 0.1)
    dead = status(cluster, ns, name).get("rollout") or {}
    assert (dead.get("stepIndex"), dead.get("stepStartedAt")) == (1, state["stepStartedAt"]), dead
    with operator_alone(cluster, ns, sole_operator, token, 2.0) as op:
        state = wait_for("the next steps", lambda: (lambda s: s if s.get("stepIndex") == 3 else None)(
            status(cluster, ns, name).get("rollout") or {}), 120, 0.1)
        assert status(cluster, ns, name)["canaryWeight"] == 75
        new = state["revision"]
        # Kill as soon as an alert is recorded (the reply comes after the durable write): not lost.
        code, _ = post(op, f"Bearer {token[0]}", alert_payload(ns, name, revision=new))
        sigkill(op, sole_operator, ns)
    assert code == 200
    with operator_alone(cluster, ns, sole_operator, token, 2.0):
        state = wait_for("the abort after the restart", lambda: (lambda s: s if s.get("aborted") else None)(
            status(cluster, ns, name).get("rollout") or {}), 60, 0.1)
        assert state["aborted"]["reason"] == "AlertFiring" and state["revision"] == new
        wait_for("stable back at full size", lambda: sum(
            1 for p in live_pods(cluster, ns, name) if p["metadata"]["labels"][names.LABEL_REVISION] == stable
            and p["metadata"]["labels"][names.LABEL_IN_ROTATION] == "true") == 4, 120, 0.2)


def test_operator_killed_again_and_again_through_a_rollout_completes_within_the_budget(
        cluster, own_namespace, token, sole_operator):
    """SIGKILL at random moments (loading, mid-step, mid-pause, promoting, scaling down): each restart
    picks up from status; the rollout completes, every pod list stays within the GPU budget.

    The rollout spans several kills by construction, whatever the machine's speed: it stops at a
    pause without a duration, and the test promotes it only after two kills at least, one of them
    with the rollout waiting there. No other operator watches the namespace (checked at each kill)."""
    ns, name = own_namespace, "chaos"
    steps = [{"setWeight": 25}, {"pause": {"duration": "2s"}}, {"setWeight": 50}, {"pause": {}},
             {"setWeight": 75}, {"pause": {"duration": "2s"}}]
    manual_pause = 3
    rng = random.Random(7)
    with operator_alone(cluster, ns, sole_operator, token, 1.0):
        cluster.apply(md(name, ns, replicas=4, steps=steps))
        stable = stable_revision(cluster, ns, name, 4)
    with BudgetWatch(cluster, ns, name, budget=5, gpus_per_pod=1) as watch:
        cluster.apply(md(name, ns, replicas=4, steps=steps, env="chaos"))
        kills, promoted_after, seen = 0, None, []
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline and kills < 80, (kills, promoted_after, seen[-10:])
            with operator_alone(cluster, ns, sole_operator, token, 1.0) as op:
                try:
                    op.process.wait(rng.uniform(0.2, 1.5))
                    raise AssertionError(f"the operator exited by itself ({op.process.returncode}):\n"
                                         f"{op.log()[-3000:]}")
                except subprocess.TimeoutExpired:
                    pass
                sigkill(op, sole_operator, ns)
            kills += 1
            s = status(cluster, ns, name)
            state = s.get("rollout") or {}
            seen.append((state.get("stepIndex"), s.get("canaryWeight"), s.get("stableRevision") != stable))
            assert "aborted" not in state, state
            if s.get("stableRevision") not in (None, stable):
                break                                        # completed (at a kill: fine either way)
            if promoted_after is None:
                assert state.get("stepIndex", 0) <= manual_pause, ("past the pause without a promote", seen)
                if kills >= 2 and state.get("stepIndex") == manual_pause:
                    promote(cluster, ns, name)               # while no operator runs
                    promoted_after = kills
            elif kills >= promoted_after + 10:
                break                                        # enough chaos: the last operator finishes
        assert promoted_after is not None and promoted_after >= 2, (kills, seen)
        print(f"chaos: {kills} kills, promoted after kill {promoted_after}; (step, weight, done) after each: {seen}")
        with operator_alone(cluster, ns, sole_operator, token, 1.0):
            new = wait_for("the rollout to complete", lambda: (lambda s: s.get("stableRevision")
                           if s.get("stableRevision") not in (None, stable) else None)(status(cluster, ns, name)),
                           180, 0.2)
            wait_for("only the new revision left, all serving", lambda: sorted(
                (p["metadata"]["labels"][names.LABEL_REVISION], p["metadata"]["labels"][names.LABEL_IN_ROTATION])
                for p in live_pods(cluster, ns, name)) == [(new, "true")] * 4, 120, 0.2)
    # The rollout went through kills: at least two before the promote, one after it at least.
    assert kills >= promoted_after + 1 >= 3, (kills, promoted_after, seen)
    assert watch.violations == [] and watch.lists > 20, (watch.violations[:3], watch.lists, watch.errors)
    assert "aborted" not in status(cluster, ns, name)["rollout"]


def test_leader_killed_mid_canary_right_after_an_alert_reaches_the_standby(cluster, own_namespace, token,
                                                                          sole_operator):
    """Two replicas with --leader-elect (as the chart runs them). Mid-canary an alert reaches the
    standby, which records the abort on the object; the leader is SIGKILLed at once. The standby
    takes over within 15 s and aborts; no step runs twice; every pod list stays within the budget."""
    ns, name, lease = own_namespace, "ha", 6
    steps = [{"setWeight": 25}, {"pause": {"duration": "2s"}}, {"setWeight": 50}, {"pause": {}}]
    args = ("--alerts-token-file", str(token[1]), "--leader-elect", "--leader-election-namespace", ns,
            "--leader-election-lease-seconds", str(lease))
    sole_operator(ns)
    with running_operator(cluster, namespaces=[ns], resync_seconds=1.0, extra_args=args) as leader:
        wait_for("the first replica to lead", lambda: "leading:" in leader.log(), 30, 0.2)
        with running_operator(cluster, namespaces=[ns], resync_seconds=1.0, extra_args=args) as standby:
            cluster.apply(md(name, ns, replicas=4, steps=steps))
            stable = stable_revision(cluster, ns, name, 4)
            with BudgetWatch(cluster, ns, name, budget=5, gpus_per_pod=1) as budget, \
                    StatusHistory(cluster, ns, name) as history:
                cluster.apply(md(name, ns, replicas=4, steps=steps, env="ha"))
                state = wait_for("the canary at its pause", lambda: (lambda s: s if s.get("stepIndex") == 3 else None)(
                    status(cluster, ns, name).get("rollout") or {}), 120, 0.1)
                new = state["revision"]
                canary_pods = {p["metadata"]["uid"] for p in live_pods(cluster, ns, name)
                               if p["metadata"]["labels"][names.LABEL_REVISION] == new}
                code, reply = post(standby, f"Bearer {token[0]}", alert_payload(ns, name, revision=new))
                leader.process.kill()                          # SIGKILL right after: no Lease release
                killed = time.monotonic()
                assert code == 200 and "leading:" not in standby.log(), reply
                aborted = wait_for("the abort by the new leader", lambda: (lambda s: s if s.get("aborted") else None)(
                    status(cluster, ns, name).get("rollout") or {}), 30, 0.1)
                took = time.monotonic() - killed
                assert "leading:" in standby.log()
                assert aborted["aborted"]["reason"] == "AlertFiring" and aborted["revision"] == new
                wait_for("stable back at full size", lambda: sorted(
                    (p["metadata"]["labels"][names.LABEL_REVISION], p["metadata"]["labels"][names.LABEL_IN_ROTATION])
                    for p in live_pods(cluster, ns, name)) == [(stable, "true")] * 4, 120, 0.2)
                wait_for("the status to settle", lambda: history.statuses and
                         (history.statuses[-1].get("rollout") or {}).get("aborted"), 10, 0.1)
    print(f"failover: aborted {took:.1f} s after the leader was killed (lease {lease} s)")
    assert took <= 15, took
    assert budget.violations == [] and budget.lists > 20, (budget.violations[:3], budget.lists, budget.errors)
    # No step ran twice: the step index only moved forward and each step started once.
    steps_seen = [((s.get("rollout") or {}).get("stepIndex"), (s.get("rollout") or {}).get("stepStartedAt"))
                  for s in history.statuses if (s.get("rollout") or {}).get("revision") == new]
    indexes = [i for i, _ in steps_seen if i is not None]
    assert indexes == sorted(indexes), steps_seen
    starts = {}
    for index, started in steps_seen:
        if index is not None and started:
            starts.setdefault(index, set()).add(started)
    assert all(len(v) == 1 for v in starts.values()), starts
    assert len(canary_pods) == 2, canary_pods            # weight 50 of 4 replicas


# --- real runtime pods under load: the alert path and the built-in scrape ------------------------

def serving_md(ns, args=(), analysis=None):
    # No GPUs: the local node's four are shared with whatever else runs there (the demo, say).
    body = md("served", ns, replicas=1, gpus=0, surge=0, node=LOCAL,
              steps=[{"setWeight": 50}, {"pause": {}}],
              analysis=analysis or {"interval": "3s", "slo": {"p99LatencyMs": 4000, "maxErrorRate": 0.2}})
    body["spec"]["model"]["servedName"] = "served"
    body["spec"]["runtime"] = {"args": ["--device", "cpu", "--max-num-seqs", "8", *args],
                               "startupTimeoutSeconds": 300, "terminationGracePeriodSeconds": 10}
    body["spec"]["resources"].update(cpu="100m", memory="1Gi")
    return body


LATENCY_RULE = {"name": "rollouts-e2e", "rules": [{
    "alert": "MoECanaryLatencyHigh",
    "expr": 'histogram_quantile(0.99, sum by (namespace, serving_moe_dev_deployment, serving_moe_dev_revision, le) '
            '(rate(moe_e2e_request_latency_seconds_bucket{serving_moe_dev_track="canary"}[10s]))) > 1.5',
    "labels": {"modeldeployment": "{{ $labels.serving_moe_dev_deployment }}",
               "revision": "{{ $labels.serving_moe_dev_revision }}", "track": "canary"},
    "annotations": {"summary": "canary p99 latency above 1.5s"}}]}


def test_alert_path_and_builtin_scrape_roll_back_under_load(cluster, ns, operator, token):
    name = "served"
    cluster.set_alert_webhook(f"http://127.0.0.1:{operator.port}/alerts", str(token[1]))
    cluster.add_rules("rollouts-e2e", [LATENCY_RULE])
    try:
        cluster.apply(serving_md(ns))
        stable = stable_revision(cluster, ns, name, 1)
        port = service_port(cluster.state_dir, ns, name)
        with Load(f"127.0.0.1:{port}", "served", rate=4, workers=6, max_seconds=400, max_requests=3000) as load:
            wait_for("answers", lambda: load.counts()[1] >= 5, 60, 0.2)
            # 1. Latency injected: Prometheus' rule fires, Alertmanager posts, the canary goes.
            cluster.apply(serving_md(ns, ["--inject-latency-ms", "2500"]))
            state = wait_for("the alert to roll back", lambda: (lambda s: s if s.get("aborted") and
                             s.get("outOfRotationAt") else None)(status(cluster, ns, name).get("rollout") or {}),
                             240, 0.5)
            assert state["aborted"]["reason"] == "AlertFiring", state["aborted"]
            assert state["aborted"]["labels"]["alertname"] == "MoECanaryLatencyHigh"
            rollback = epoch(state["outOfRotationAt"]) - epoch(state["aborted"]["at"])
            # The 2 s goal is the benchmark's (bench_rollback, p95 over trials); here, on a shared and
            # loaded machine, one sample only has to show the alert acted at once, not at a resync.
            assert 0 <= rollback < 5.0, rollback
            # 2. Errors injected, no Prometheus involved: the operator's own scrape fails it.
            cluster.apply(serving_md(ns, ["--inject-error-rate", "0.9"]))
            state = wait_for("the built-in analysis to roll back", lambda: (lambda s: s if s.get("aborted") and
                             s.get("revision") != state["revision"] else None)(
                status(cluster, ns, name).get("rollout") or {}), 240, 0.5)
            assert state["aborted"]["reason"] == "AnalysisFailed" and "error rate" in state["aborted"]["message"]
            assert status(cluster, ns, name)["stableRevision"] == stable
    finally:
        cluster.remove_rules("rollouts-e2e")
        cluster.set_alert_webhook(None)


def test_blue_green_switch_and_instant_rollback_under_load_without_failures(cluster, ns, operator):
    name = "bluegreen"
    body = serving_md(ns)
    body["metadata"]["name"] = name
    body["spec"]["model"]["servedName"] = name
    body["spec"]["rollout"] = {"strategy": "BlueGreen", "analysis": {"slo": {}},
                               "blueGreen": {"previewReplicas": 1, "scaleDownDelaySeconds": 60}}
    cluster.apply(body)
    stable = stable_revision(cluster, ns, name, 1)
    port = service_port(cluster.state_dir, ns, name)
    with Load(f"127.0.0.1:{port}", name, rate=4, workers=4, max_seconds=300, max_requests=2000) as load:
        wait_for("answers", lambda: load.counts()[1] >= 5, 60, 0.2)
        body["spec"]["runtime"]["args"] = [*body["spec"]["runtime"]["args"], "--max-num-seqs", "6"]
        cluster.apply(body)
        wait_for("the preview ready", lambda: (status(cluster, ns, name).get("rollout") or {}).get("previewReadyAt"),
                 300, 0.5)
        assert {p["metadata"]["labels"][names.LABEL_IN_ROTATION] for p in live_pods(cluster, ns, name)
                if p["metadata"]["labels"][names.LABEL_TRACK] == "preview"} == {"false"}
        cluster.kubectl("annotate", "md", name, "-n", ns, "--overwrite", f"{ANNOTATION_PROMOTE}=now")
        new = wait_for("the switch", lambda: (lambda s: s.get("stableRevision") if s.get("stableRevision") != stable
                       else None)(status(cluster, ns, name)), 120, 0.2)
        switched = time.time()
        wait_for("traffic on the new revision", lambda: load.counts(since=switched + 1)[1] >= 8, 60, 0.2)
        # The old revision is warm: an abort switches straight back.
        abort = AbortRequest(new, "AbortedByUser", "e2e", time.time(), "user").to_json()
        cluster.kubectl("annotate", "md", name, "-n", ns, "--overwrite", f"{ANNOTATION_ABORT}={abort}")
        wait_for("the switch back", lambda: status(cluster, ns, name).get("stableRevision") == stable, 60, 0.1)
        back = time.time()
        wait_for("traffic back on the old revision", lambda: load.counts(since=back + 1)[1] >= 8, 60, 0.2)
        wait_for("the new revision's pods gone", lambda: not any(
            p["metadata"]["labels"][names.LABEL_REVISION] == new for p in live_pods(cluster, ns, name)), 180, 0.5)
        gone = time.time()
        # Requests in flight through the drain finish, and more are served after it.
        wait_for("traffic after the drain", lambda: load.counts(since=gone)[1] >= 4, 60, 0.2)
    failed, total = load.counts()
    assert failed == 0 and total > 30, (failed, total, load.errors())
