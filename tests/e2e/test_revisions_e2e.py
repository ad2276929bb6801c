"""Revisions end to end, as a user sees them: real runtime pods on the local node, several replicas.

Every pod of a revision runs that revision's recorded template (its ControllerRevision), whatever
the spec says now: the stable groups brought back by an abort, a stable pod deleted by hand, a group
added by a scale-up in the middle of a canary. Every answer names the revision that served it
(`x-moe-revision`), so the tests count which revision served each request: blue-green switches
over and back at once with no failed request, and a change of group shape (`podsPerReplica` 1 -> 2)
keeps every serving group whole.

One ModelDeployment goes through every test (each starts by settling it on revision A, two groups),
so the module loads few models: revision A (tiny DeepSeek-V3), B (tiny Qwen3-MoE, aborted at the
canary's pause), C (tiny Mixtral, a scale-up at the pause, then undone), D (Qwen3-MoE with other
flags, blue-green) and E (A's model, two pods per group).
"""

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from moe_operator.api import names
from moe_operator.api.spec import ModelDeployment
from moe_operator.desired.pods import PodSlot, desired_pod, template_fingerprint

from devtools.harness import wait_for
from devtools.loadgen import Load, service_port

pytestmark = pytest.mark.e2e

NAME = "revs"
LOCAL = {"devcluster.serving.moe.dev/local": "true"}
LOCAL_NODE_GPUS = 4                   # devcluster.cluster.control_plane.LOCAL_NODE_GPUS
MODEL_A = "builtin:tiny-deepseek-v3"
MODEL_B = "builtin:tiny-qwen3-moe"
MODEL_C = "builtin:tiny-mixtral"
CANARY = {"strategy": "Canary", "maxSurgeGPUs": 1, "analysis": {"slo": {}},
          "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}
LOADS = 240                           # seconds: a runtime pod loading and warming up on a shared CPU


@pytest.fixture(autouse=True)
def explain_failure(request, cluster, ns, operator):
    """On failure, print what a user would look at: the pods, the status and the operator's log."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        print("\n--- pods ---\n" + cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", "--show-labels",
                                                  check=False).stdout)
        print("--- kubectl moe status ---\n" + moe(cluster, "status", NAME, "-n", ns, check=False).stdout)
        print("--- operator log (tail) ---\n" + operator.log()[-6000:])


# --- the ModelDeployment and what its pods are -----------------------------------------------------

def deployment(ns, model=MODEL_A, replicas=2, pods_per_replica=1, args=(), rollout=None):
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": NAME, "namespace": ns},
            "spec": {"replicas": replicas,
                     "model": {"source": model, "servedName": NAME, "dtype": "float32"},
                     "runtime": {"args": ["--device", "cpu", "--max-num-seqs", "4", *args],
                                 "startupTimeoutSeconds": 300, "terminationGracePeriodSeconds": 10},
                     "resources": {"gpus": 1, "cpu": "100m", "memory": "1Gi"},
                     "topology": {"podsPerReplica": pods_per_replica},
                     "scheduling": {"nodeSelector": LOCAL},
                     "rollout": rollout or CANARY}}


def get(cluster, *args):
    return cluster.get_json(*args)


def status(cluster, ns):
    return get(cluster, "md", NAME, "-n", ns).get("status") or {}


def all_pods(cluster, ns):
    """Every pod of the ModelDeployment, terminating ones included."""
    return get(cluster, "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={NAME}")["items"]


def labels(pod):
    return pod["metadata"].get("labels") or {}


def revision(pod):
    return labels(pod).get(names.LABEL_REVISION)


def terminating(pod):
    return bool(pod["metadata"].get("deletionTimestamp"))


def ready(pod):
    return not terminating(pod) and any(c.get("type") == "Ready" and c.get("status") == "True"
                                        for c in (pod.get("status") or {}).get("conditions") or [])


def in_rotation(pod):
    return labels(pod).get(names.LABEL_IN_ROTATION) == "true"


def runtime_container(pod):
    return next(c for c in pod["spec"]["containers"] if c["name"] == "runtime")


def model_arg(pod):
    args = runtime_container(pod)["args"]
    return args[args.index("--model") + 1]


def env(pod, key):
    return next((e.get("value") for e in runtime_container(pod).get("env") or () if e["name"] == key), None)


def groups(pods):
    """(revision, replica) -> pods, of the pods not terminating."""
    out = {}
    for p in pods:
        if not terminating(p):
            out.setdefault((revision(p), int(labels(p)[names.LABEL_REPLICA])), []).append(p)
    return out


def group_size(pod):
    return int(env(pod, "MOE_WORLD_SIZE") or 1)


def serving(pods, rev):
    """How many groups of `rev` serve: every pod present, ready and in rotation."""
    return sum(1 for (r, _), members in groups(pods).items() if r == rev
               and len(members) == group_size(members[0]) and all(ready(p) and in_rotation(p) for p in members))


def only(pods, rev, count):
    """True when the pods (terminating ones included) are all of `rev` and `count` groups serve."""
    return bool(pods) and all(revision(p) == rev for p in pods) and serving(pods, rev) == count \
        and len(groups(pods)) == count


def record(cluster, ns, rev):
    return get(cluster, "controllerrevision", f"{NAME}-{rev}", "-n", ns)


def built_from_record(cluster, ns, pod):
    """What the pod's revision's ControllerRevision builds for this pod's slot (container identity)."""
    rec = record(cluster, ns, revision(pod))
    assert rec["metadata"]["labels"][names.LABEL_REVISION] == revision(pod)
    md = ModelDeployment.from_body(get(cluster, "md", NAME, "-n", ns)).with_template(rec["data"]["spec"])
    ls = labels(pod)
    slot = PodSlot(revision(pod), int(ls[names.LABEL_REPLICA]), int(ls[names.LABEL_RANK]), ls[names.LABEL_TRACK],
                   in_rotation(pod), pod["metadata"]["name"])
    return desired_pod(md, slot)


def identity(pod):
    c = runtime_container(pod)
    return {k: c.get(k) for k in ("image", "command", "args", "env")}


def assert_runs_its_template(cluster, ns, pod, model):
    """The pod runs `model` under its own revision, exactly as its revision's record builds it."""
    name = pod["metadata"]["name"]
    assert model_arg(pod) == model, (name, runtime_container(pod)["args"])
    assert env(pod, "MOE_REVISION") == revision(pod), (name, env(pod, "MOE_REVISION"), revision(pod))
    want = built_from_record(cluster, ns, pod)
    assert identity(pod) == identity(want), name
    assert template_fingerprint(pod) == template_fingerprint(want), name


def moe(cluster, *args, check=True):
    """`kubectl moe ...` as a user runs it (the installed kubectl-moe entry point)."""
    plugin = Path(sys.executable).with_name("kubectl-moe")
    cmd = [str(plugin)] if plugin.exists() else [sys.executable, "-m", "moe_operator.app.kubectl_plugin"]
    done = subprocess.run([*cmd, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True,
                          text=True, timeout=60)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def answers(port, count):
    """`count` requests, one after another, through the Service: the revision (or error) of each."""
    load = Load(f"127.0.0.1:{port}", NAME, timeout=30)
    return [r.revision if r.ok else f"failed: {r.error}" for r in (load.one() for _ in range(count))]


def local_gpus_free_of_others(cluster, ns):
    """GPUs of the local node not held by pods of other namespaces (the tests need all four)."""
    pods = get(cluster, "pods", "-A", "--field-selector", "spec.nodeName=devcluster-local")["items"]
    held = {}
    for p in pods:
        if p["metadata"]["namespace"] == ns or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        gpus = sum(int(((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu", 0))
                   for c in p["spec"]["containers"])
        if gpus:
            held[f"{p['metadata']['namespace']}/{p['metadata']['name']}"] = gpus
    return LOCAL_NODE_GPUS - sum(held.values()), held


def settle_on_a(cluster, ns, rollout=None):
    """The ModelDeployment at revision A (two groups serving, nothing else left), with `rollout`
    settings (no new revision). Returns A."""
    try:
        wait_for("the local node's GPUs", lambda: local_gpus_free_of_others(cluster, ns)[0] == LOCAL_NODE_GPUS,
                 120, 1.0)
    except AssertionError:
        raise AssertionError(f"pods of other namespaces hold GPUs of the local node (these tests need all "
                             f"{LOCAL_NODE_GPUS}): {local_gpus_free_of_others(cluster, ns)[1]}") from None
    cluster.apply(deployment(ns, rollout=rollout))
    return wait_for("revision A alone, two groups serving", lambda: (lambda s: s.get("stableRevision")
                    if s.get("currentRevision") == s.get("stableRevision") and s.get("readyReplicas") == 2
                    and only(all_pods(cluster, ns), s.get("stableRevision"), 2) else None)(status(cluster, ns)),
                    LOADS, 0.5)


def new_revision(cluster, ns, old):
    return wait_for("the new revision in status", lambda: (lambda s: s.get("currentRevision")
                    if s.get("currentRevision") not in (None, old) else None)(status(cluster, ns)), 30, 0.2)


def at_the_pause(cluster, ns, stable, canary, canary_groups=1, stable_groups=1):
    """Waits for the canary's pause step with that many serving groups of each revision, nothing
    else running; returns the pods."""
    def check():
        s = status(cluster, ns)
        pods = all_pods(cluster, ns)
        at_pause = ((s.get("rollout") or {}).get("stepIndex") == 1 and s.get("canaryWeight") == 50
                    and serving(pods, canary) == canary_groups and serving(pods, stable) == stable_groups
                    and len(groups(pods)) == canary_groups + stable_groups)
        return pods if at_pause else None
    return wait_for(f"the pause: {canary_groups} canary and {stable_groups} stable group(s) serving", check,
                    LOADS, 0.5)


class PodWatch:
    """Lists the ModelDeployment's pods in a thread for the length of a `with` block: keeps the
    first sighting of every pod, and every list in which a group in rotation is not whole (a pod of
    one of its ranks missing or terminating)."""

    def __init__(self, cluster, ns):
        from kubernetes import client, config
        self.core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))
        self.ns = ns
        self.seen: dict[str, dict] = {}
        self.broken: list[tuple[float, str, int, list[str]]] = []
        self.lists = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                items = self.core.list_namespaced_pod(self.ns, label_selector=f"{names.LABEL_DEPLOYMENT}={NAME}",
                                                      _request_timeout=30).items
            except Exception:      # a failed list checks nothing; the next one does
                self._stop.wait(0.2)
                continue
            pods = [self.core.api_client.sanitize_for_serialization(p) for p in items]
            self.lists += 1
            by_group = {}
            for p in pods:
                self.seen.setdefault(p["metadata"]["uid"], p)
                by_group.setdefault((revision(p), int(labels(p)[names.LABEL_REPLICA])), []).append(p)
            for (rev, replica), members in by_group.items():
                if not any(in_rotation(p) for p in members):
                    continue
                whole = sorted(int(labels(p)[names.LABEL_RANK]) for p in members if not terminating(p))
                if whole != list(range(group_size(members[0]))):
                    self.broken.append((time.time(), rev, replica, sorted(
                        f"{p['metadata']['name']}{' (terminating)' if terminating(p) else ''}" for p in members)))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join(40)


# --- 1. the scenario: abort at the pause, then a stable pod lost -------------------------

def test_abort_at_the_pause_brings_back_the_stable_model_and_a_lost_stable_pod_comes_back_as_stable(
        cluster, ns, operator):
    a = settle_on_a(cluster, ns)
    for p in all_pods(cluster, ns):
        assert_runs_its_template(cluster, ns, p, MODEL_A)
    cluster.apply(deployment(ns, model=MODEL_B))
    b = new_revision(cluster, ns, a)
    pods = at_the_pause(cluster, ns, stable=a, canary=b)
    for p in pods:
        assert_runs_its_template(cluster, ns, p, MODEL_A if revision(p) == a else MODEL_B)
    before = {p["metadata"]["uid"] for p in pods}

    print(moe(cluster, "abort", NAME, "-n", ns).stdout.strip())
    state = wait_for("the abort", lambda: (status(cluster, ns).get("rollout") or {}).get("aborted"), 30, 0.2)
    assert state["reason"] == "AbortedByUser", state
    pods = wait_for("revision A alone again, two groups serving", lambda: (lambda ps: ps if only(ps, a, 2) else None)(
        all_pods(cluster, ns)), LOADS, 0.5)
    for p in pods:
        assert labels(p)[names.LABEL_TRACK] == "stable"
        assert_runs_its_template(cluster, ns, p, MODEL_A)
    recreated = [p["metadata"]["name"] for p in pods if p["metadata"]["uid"] not in before]
    assert recreated, "the stable group that made room for the canary was not re-created"
    print(f"after the abort: stable group(s) re-created with A's template: {recreated}")
    s = status(cluster, ns)
    assert (s["stableRevision"], s["readyReplicas"]) == (a, 2), s

    port = service_port(cluster.state_dir, ns, NAME)
    served = answers(port, 20)
    assert served == [a] * 20, served

    # A stable pod lost by hand comes back with A's template, though the spec still says B.
    victim = pods[0]
    cluster.kubectl("delete", "pod", victim["metadata"]["name"], "-n", ns, "--wait=false")
    before = {p["metadata"]["uid"] for p in pods}

    def replacement():
        ps = all_pods(cluster, ns)
        new = [p for p in ps if p["metadata"]["uid"] not in before and not terminating(p)]
        return new[0] if len(new) == 1 and only(ps, a, 2) else None
    new = wait_for("the deleted stable pod's replacement serving", replacement, LOADS, 0.5)
    assert labels(new)[names.LABEL_TRACK] == "stable"
    assert_runs_its_template(cluster, ns, new, MODEL_A)
    assert get(cluster, "md", NAME, "-n", ns)["spec"]["model"]["source"] == MODEL_B   # the spec still says B
    assert answers(port, 10) == [a] * 10

    history = moe(cluster, "history", NAME, "-n", ns).stdout
    print(history)
    rows = {line.split()[1]: line for line in history.splitlines()[1:] if len(line.split()) > 1}
    assert a in rows and b in rows, history
    assert "aborted" in rows[b] and "AbortedByUser" in rows[b], rows[b]
    assert f"{MODEL_A} -> {MODEL_B}" in rows[b], rows[b]
    assert "stable" in rows[a] and "aborted" not in rows[a], rows[a]


# --- 2. a scale-up during a canary ---------------------------------------------------------------

def test_scale_up_at_the_canary_pause_adds_stable_groups_of_the_stable_template(cluster, ns, operator):
    a = settle_on_a(cluster, ns)
    cluster.apply(deployment(ns, model=MODEL_C))
    c = new_revision(cluster, ns, a)
    pods = at_the_pause(cluster, ns, stable=a, canary=c)
    before = {p["metadata"]["uid"] for p in pods}
    with PodWatch(cluster, ns) as watch:
        cluster.kubectl("scale", "md", NAME, "-n", ns, "--replicas=3")
        # 50% of 3 groups is 2 canary groups (and at least 1 stable); while the second canary group
        # loads, a second stable group keeps the capacity: it is A's, whatever the spec says.
        added = wait_for("a stable group added by the scale-up", lambda: [
            p for p in all_pods(cluster, ns) if p["metadata"]["uid"] not in before and revision(p) == a], 60, 0.2)
        # Then one stable group serves beside two canary groups, and the rest is gone.
        wait_for("two canary groups and one stable group serving, nothing else", lambda: (lambda ps: (
            serving(ps, c), serving(ps, a), len(groups(ps)), len(ps)) == (2, 1, 3, 3))(all_pods(cluster, ns)),
            LOADS, 0.5)
    for p in added:
        assert labels(p)[names.LABEL_TRACK] == "stable"
        assert_runs_its_template(cluster, ns, p, MODEL_A)
    print(f"scale-up at the pause: stable pod(s) {[p['metadata']['name'] for p in added]} run {MODEL_A}")
    # Every pod that existed meanwhile ran its own revision's model.
    models = {a: MODEL_A, c: MODEL_C}
    assert {(revision(p), model_arg(p)) for p in watch.seen.values()} <= set(models.items()), \
        sorted({(p["metadata"]["name"], model_arg(p)) for p in watch.seen.values()})
    assert answers(service_port(cluster.state_dir, ns, f"{NAME}-stable"), 6) == [a] * 6

    # Back to A by its number in the history (the spec's model returns to A's).
    cluster.kubectl("scale", "md", NAME, "-n", ns, "--replicas=2")
    history = moe(cluster, "history", NAME, "-n", ns).stdout
    number = next(line.split()[0] for line in history.splitlines()[1:] if line.split()[1:2] == [a])
    print(moe(cluster, "undo", NAME, "-n", ns, "--to-revision", number).stdout.strip())
    assert get(cluster, "md", NAME, "-n", ns)["spec"]["model"]["source"] == MODEL_A
    wait_for("revision A alone, two groups serving", lambda: (lambda s: s.get("currentRevision") == a
             and s.get("stableRevision") == a and only(all_pods(cluster, ns), a, 2))(status(cluster, ns)), LOADS, 0.5)


# --- 3. blue-green under load: over and back at once ---------------------------------------------

def test_blue_green_serves_the_new_revision_after_the_switch_and_the_old_one_at_once_after_an_alert(
        cluster, ns, operator, token):
    blue_green = {"strategy": "BlueGreen", "analysis": {"slo": {}},     # maxSurgeGPUs: the default
                  "blueGreen": {"previewReplicas": 1, "scaleDownDelaySeconds": 60}}
    a = settle_on_a(cluster, ns, rollout=blue_green)
    a_pods = {p["metadata"]["uid"] for p in all_pods(cluster, ns)}
    port = service_port(cluster.state_dir, ns, NAME)
    with Load(f"127.0.0.1:{port}", NAME, rate=5, workers=4, max_seconds=300, max_requests=2500) as load:
        wait_for("answers", lambda: load.counts()[1] >= 5, 60, 0.2)
        cluster.apply(deployment(ns, model=MODEL_B, args=["--max-num-seqs", "6"], rollout=blue_green))
        d = new_revision(cluster, ns, a)
        wait_for("the preview ready", lambda: (status(cluster, ns).get("rollout") or {}).get("previewReadyAt"),
                 LOADS, 0.5)
        promoted = time.time()
        moe(cluster, "promote", NAME, "-n", ns)
        wait_for("the switch", lambda: status(cluster, ns).get("stableRevision") == d, LOADS, 0.2)
        switched = time.time()
        # The whole old revision is still there, warm (the default budget holds two copies).
        assert {p["metadata"]["uid"] for p in all_pods(cluster, ns) if revision(p) == a and not terminating(p)} \
            == a_pods
        wait_for("answers after the switch", lambda: len(
            [r for r in load.served(switched + 1) if r.at - r.seconds >= switched + 1]) >= 10, 60, 0.2)
        # An Alertmanager alert about the new revision, posted as Alertmanager posts it.
        aborted = time.time()
        code, reply = post_alert(operator, token, ns, d)
        written = time.time()          # the abort is recorded (the reply waits up to 5 s for its reconcile)
        assert code == 200 and [e["revision"] for e in reply["aborted"]] == [d], reply
        assert reply["aborted"][0]["rollback"].startswith("instant"), reply
        wait_for("the switch back", lambda: status(cluster, ns).get("stableRevision") == a, 30, 0.1)
        back = time.time()
        wait_for("answers after the switch back", lambda: len(
            [r for r in load.served(back + 1) if r.at - r.seconds >= back + 1]) >= 10, 60, 0.2)
        wait_for("the aborted revision's pods gone", lambda: all(
            revision(p) == a for p in all_pods(cluster, ns)), 120, 0.5)
        gone = time.time()
        wait_for("answers after the drain", lambda: load.counts(since=gone)[1] >= 5, 60, 0.2)
    results = load.served()
    failed, total = load.counts()
    assert failed == 0 and total > 40, (failed, total, load.errors())

    def revisions(first, last):
        """Revision -> count of the answers that started and finished within [first, last]."""
        out = {}
        for r in results:
            if first <= r.at - r.seconds and r.at <= last:
                out[r.revision] = out.get(r.revision, 0) + 1
        return out
    before_switch = revisions(0, promoted)
    after_switch = revisions(switched + 1, aborted)
    after_abort = revisions(back + 1, time.time())
    print(f"blue-green answers by revision: before the promote {before_switch}, after the switch {after_switch}, "
          f"after the abort {after_abort}")
    assert set(before_switch) == {a} and before_switch[a] >= 5, before_switch
    assert set(after_switch) == {d} and after_switch[d] >= 10, after_switch
    assert set(after_abort) == {a} and after_abort[a] >= 10, after_abort
    # Switched back at once: no answer from the aborted revision started later than a few seconds
    # after the alert was answered, and no old pod was re-created (none had to load).
    last_d = max((r.at - r.seconds for r in results if r.revision == d), default=aborted)
    print(f"switch back: the /alerts post took {written - aborted:.2f}s; status switched back "
          f"{back - written:+.2f}s after it returned; the last request served by the aborted revision started "
          f"{last_d - written:+.2f}s after it returned")
    assert back - written < 5.0 and last_d - written < 5.0, (back - written, last_d - written)
    assert {p["metadata"]["uid"] for p in all_pods(cluster, ns)} == a_pods


# --- 4. a change of group shape under load --------------------------------------------------------

def test_pods_per_replica_change_under_load_keeps_serving_groups_whole_without_failures(cluster, ns, operator):
    # Two pods per group need four GPUs for two groups: all of the local node, so no surge.
    rollout = {**CANARY, "maxSurgeGPUs": 0}
    a = settle_on_a(cluster, ns, rollout=rollout)
    port = service_port(cluster.state_dir, ns, NAME)
    with PodWatch(cluster, ns) as watch, \
            Load(f"127.0.0.1:{port}", NAME, rate=5, workers=4, max_seconds=400, max_requests=3000) as load:
        wait_for("answers", lambda: load.counts()[1] >= 5, 60, 0.2)
        cluster.apply(deployment(ns, pods_per_replica=2, rollout=rollout))
        e = new_revision(cluster, ns, a)
        pods = at_the_pause(cluster, ns, stable=a, canary=e)
        assert sorted(len(m) for m in groups(pods).values()) == [1, 2], [p["metadata"]["name"] for p in pods]
        moe(cluster, "promote", NAME, "-n", ns)
        wait_for("the new shape promoted, two groups of two pods serving", lambda: (lambda s: s.get(
            "stableRevision") == e and only(all_pods(cluster, ns), e, 2))(status(cluster, ns)), LOADS, 0.5)
        done = time.time()
        wait_for("answers after the rollout", lambda: load.counts(since=done)[1] >= 5, 60, 0.2)
    failed, total = load.counts()
    by_revision = {}
    for r in load.served():
        by_revision[r.revision] = by_revision.get(r.revision, 0) + 1
    print(f"podsPerReplica 1 -> 2: {total} requests, {failed} failed, by revision {by_revision}; "
          f"{watch.lists} pod lists, {len(watch.seen)} pods seen")
    assert failed == 0 and total > 30, (failed, total, load.errors())
    assert watch.lists > 50, watch.lists
    assert watch.broken == [], watch.broken[:5]
    assert set(by_revision) == {a, e}, by_revision
    for p in all_pods(cluster, ns):
        assert_runs_its_template(cluster, ns, p, MODEL_A)
        assert group_size(p) == 2


def post_alert(operator, token, ns, revision):
    """POST an Alertmanager webhook payload (one firing alert about `revision`) to the operator's /alerts."""
    starts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = json.dumps({"version": "4", "status": "firing", "receiver": "moe", "groupKey": "{}:{}", "alerts": [{
        "status": "firing", "startsAt": starts, "annotations": {"summary": "p99 latency above the SLO"},
        "labels": {"alertname": "MoELatencyHigh", "namespace": ns, "modeldeployment": NAME, "revision": revision}}]})
    request = urllib.request.Request(f"http://127.0.0.1:{operator.port}/alerts", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {token[0]}"})
    with urllib.request.urlopen(request, timeout=15) as response:
        return response.status, json.loads(response.read())
