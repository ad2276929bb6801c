"""Replica groups of two pods end to end: one runtime server over two real runtime pods on the local
node (`topology.podsPerReplica: 2`, `--device cpu`, gloo between the pods' ranks, which meet at the
leader's name `rank-0.<group Service>.<namespace>` through the devcluster's DNS).

What a user sees:
1. the group answers through `<name>` with the same greedy text as a one-pod deployment of the same
   model, each pod holds its share of the weights (`moe_weight_bytes{rank}` on its /metrics), and
   rank 1's pod refuses inference (404: requests go to rank 0's pod);
2. a rank lost (rank 1's process killed, then rank 1's pod deleted with grace 0) takes the group out
   of rotation at once, says which rank (Degraded GroupRestarting and its Event), and re-creates both
   pods, which serve again;
3. a canary of the group (promoted) and then a rollback (aborted at the pause) under bounded load:
   no failed request, and each stage served by the right revision (`x-moe-revision`).

One 2-pod ModelDeployment goes through every test; the one-pod reference loads beside it at first
and is deleted once measured. GPUs: 1 per pod (the local node has 4: a canary of a 2-pod group
takes all of them).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from moe_operator.api import names, reasons

from devtools.harness import wait_for
from devtools.loadgen import Load, service_port

pytestmark = pytest.mark.e2e

NAME = "grp"                          # the 2-pod ModelDeployment
ONE = "one"                           # the one-pod reference
MODEL = "builtin:tiny-deepseek-v3"
LOCAL = {"devcluster.serving.moe.dev/local": "true"}
LOCAL_NODE_GPUS = 4                   # devcluster.cluster.control_plane.LOCAL_NODE_GPUS
ARGS = ["--device", "cpu", "--enable-expert-parallel", "--seed", "0", "--max-num-seqs", "4"]
CANARY = {"strategy": "Canary", "maxSurgeGPUs": 2, "analysis": {"slo": {}},
          "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}
PROMPTS = ["The capital of", "Once upon a time", "experts route tokens to", "1 2 3 4"]
MAX_TOKENS = 12
LOADS = 240                           # seconds: runtime pods loading and warming up on a shared CPU
OUT_OF_ROTATION_S = 5.0               # "at once": a lost rank's group leaves rotation within this


@pytest.fixture(autouse=True)
def explain_failure(request, cluster, ns, operator):
    """On failure, print what a user would look at: the pods, the status, the events, the operator's log."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        print("\n--- pods ---\n" + cluster.kubectl("get", "pods", "-n", ns, "-o", "wide", "--show-labels",
                                                  check=False).stdout)
        print("--- status ---\n" + json.dumps(
            (get(cluster, "md", NAME, "-n", ns).get("status") or {}), indent=1)[-4000:])
        print("--- events ---\n" + cluster.kubectl("get", "events", "-n", ns, "--sort-by=.lastTimestamp",
                                                   check=False).stdout[-4000:])
        print("--- operator log (tail) ---\n" + operator.log()[-6000:])


# --- the ModelDeployments and what their pods are --------------------------------------------------

def deployment(ns, name=NAME, pods_per_replica=2, variant="a"):
    """A ModelDeployment of one replica; `variant` (an env var) makes a new revision."""
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": ns},
            "spec": {"replicas": 1,
                     "model": {"source": MODEL, "servedName": name, "dtype": "float32"},
                     "runtime": {"args": ARGS, "env": [{"name": "GROUPS_E2E_VARIANT", "value": variant}],
                                 "startupTimeoutSeconds": 300, "terminationGracePeriodSeconds": 10},
                     "resources": {"gpus": 1, "cpu": "100m", "memory": "1Gi"},
                     "topology": {"podsPerReplica": pods_per_replica},
                     "scheduling": {"nodeSelector": LOCAL},
                     "rollout": CANARY}}


def get(cluster, *args):
    return cluster.get_json(*args)


def status(cluster, ns, name=NAME):
    return get(cluster, "md", name, "-n", ns).get("status") or {}


def condition(s, ctype):
    return next((c for c in s.get("conditions") or () if c["type"] == ctype), {})


def all_pods(cluster, ns, name=NAME):
    """Every pod of the ModelDeployment, terminating ones included."""
    return get(cluster, "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={name}")["items"]


def labels(pod):
    return pod["metadata"].get("labels") or {}


def revision(pod):
    return labels(pod).get(names.LABEL_REVISION)


def rank(pod):
    return int(labels(pod)[names.LABEL_RANK])


def uid(pod):
    return pod["metadata"]["uid"]


def terminating(pod):
    return bool(pod["metadata"].get("deletionTimestamp"))


def ready(pod):
    return not terminating(pod) and any(c.get("type") == "Ready" and c.get("status") == "True"
                                        for c in (pod.get("status") or {}).get("conditions") or [])


def in_rotation(pod):
    return labels(pod).get(names.LABEL_IN_ROTATION) == "true"


def env(pod, key):
    return next((e.get("value") for e in pod["spec"]["containers"][0].get("env") or () if e["name"] == key), None)


def group_size(pod):
    return int(env(pod, "MOE_WORLD_SIZE") or 1)


def serving_groups(pods, rev):
    """How many groups of `rev` serve: every rank's pod present, ready and in rotation."""
    groups = {}
    for p in pods:
        if revision(p) == rev and not terminating(p):
            groups.setdefault(labels(p)[names.LABEL_REPLICA], {})[rank(p)] = p
    return sum(1 for members in groups.values()
               if sorted(members) == list(range(group_size(next(iter(members.values())))))
               and all(ready(p) and in_rotation(p) for p in members.values()))


def only(pods, rev, size):
    """The pods (terminating ones included) are one serving group of `rev`, of `size` pods: returns
    them by rank."""
    if len(pods) == size and all(revision(p) == rev for p in pods) and serving_groups(pods, rev) == 1:
        return {rank(p): p for p in pods}
    return None


def available(cluster, ns, name=NAME, size=2, timeout=LOADS):
    """Waits for the ModelDeployment to be Available on one revision, its one group serving and
    nothing else left; returns (revision, pods by rank)."""
    def check():
        s = status(cluster, ns, name)
        rev = s.get("stableRevision")
        if not (condition(s, "Available").get("status") == "True" and rev and s.get("currentRevision") == rev
                and s.get("readyReplicas") == 1):
            return None
        pods = only(all_pods(cluster, ns, name), rev, size)
        return (rev, pods) if pods else None
    return wait_for(f"{name} Available: one group of {size} pod(s) serving, nothing else", check, timeout, 0.5)


def new_revision(cluster, ns, old):
    return wait_for("the new revision in status", lambda: (lambda s: s.get("currentRevision")
                    if s.get("currentRevision") not in (None, old) else None)(status(cluster, ns)), 30, 0.2)


def at_the_pause(cluster, ns, stable, canary):
    """Waits for the canary's pause: one group of each revision serving, nothing else."""
    def check():
        s = status(cluster, ns)
        pods = all_pods(cluster, ns)
        return ((s.get("rollout") or {}).get("stepIndex") == 1 and s.get("canaryWeight") == 50
                and serving_groups(pods, canary) == 1 and serving_groups(pods, stable) == 1 and len(pods) == 4)
    wait_for("the canary's pause: one group of each revision serving", check, LOADS, 0.5)


def moe(cluster, *args):
    """`kubectl moe ...` as a user runs it."""
    plugin = Path(sys.executable).with_name("kubectl-moe")
    cmd = [str(plugin)] if plugin.exists() else [sys.executable, "-m", "moe_operator.app.kubectl_plugin"]
    done = subprocess.run([*cmd, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout.strip()


# --- HTTP: through a Service (the devcluster's proxy) or to a pod's IP ------------------------------

def http(url, body=None, timeout=60):
    """(status, headers, text) of a GET (or a JSON POST when body is given)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def greedy_texts(cluster, ns, name):
    """The OpenAI completions (temperature 0) of PROMPTS through Service `name`: (texts, revisions)."""
    port = service_port(cluster.state_dir, ns, name)
    texts, revisions = [], set()
    for prompt in PROMPTS:
        code, headers, text = http(f"http://127.0.0.1:{port}/v1/completions",
                                   {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert code == 200, (name, prompt, code, text)
        texts.append(json.loads(text)["choices"][0]["text"])
        revisions.add({k.lower(): v for k, v in headers.items()}.get("x-moe-revision"))
    return texts, revisions


def pod_url(pod, path):
    return f"http://{pod['status']['podIP']}:{names.HTTP_PORT}{path}"


def weight_bytes(pod):
    """rank -> moe_weight_bytes on the pod's /metrics."""
    code, _, text = http(pod_url(pod, "/metrics"), timeout=10)
    assert code == 200, (pod["metadata"]["name"], code, text[:500])
    found = {}
    for line in text.splitlines():
        m = re.match(r'moe_weight_bytes\{([^}]*)\}\s+(\S+)$', line)
        if m:
            rank_label = re.search(r'rank="(\d+)"', m.group(1))
            found[int(rank_label.group(1))] = float(m.group(2))
    return found


def started_after(results, t):
    return [r for r in results if r.at - r.seconds >= t]


def by_revision(results):
    out = {}
    for r in results:
        out[r.revision] = out.get(r.revision, 0) + 1
    return out


# --- module set-up: the group, and the one-pod reference beside it --------------------------------

def local_gpus_held_by_others(cluster, ns):
    pods = get(cluster, "pods", "-A", "--field-selector", "spec.nodeName=devcluster-local")["items"]
    held = {}
    for p in pods:
        if p["metadata"]["namespace"] == ns or (p.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            continue
        gpus = sum(int(((c.get("resources") or {}).get("requests") or {}).get("nvidia.com/gpu", 0))
                   for c in p["spec"]["containers"])
        if gpus:
            held[f"{p['metadata']['namespace']}/{p['metadata']['name']}"] = gpus
    return held


@pytest.fixture(scope="module")
def group(cluster, ns, operator):
    """The 2-pod ModelDeployment, applied (not waited for)."""
    try:
        wait_for("the local node's GPUs", lambda: not local_gpus_held_by_others(cluster, ns), 120, 1.0)
    except AssertionError:
        raise AssertionError(f"pods of other namespaces hold GPUs of the local node (these tests need all "
                             f"{LOCAL_NODE_GPUS}): {local_gpus_held_by_others(cluster, ns)}") from None
    cluster.apply(deployment(ns))
    return NAME


@pytest.fixture(scope="module")
def reference(cluster, ns, operator, group):
    """The one-pod deployment's greedy texts and whole-model weight bytes (it loads beside the group,
    which was applied first); deleted once measured, so that a re-created group and the canary have
    the local node's GPUs."""
    cluster.apply(deployment(ns, name=ONE, pods_per_replica=1))
    try:
        _, pods = available(cluster, ns, ONE, size=1)
        texts, _ = greedy_texts(cluster, ns, ONE)
        whole = weight_bytes(pods[0])
    finally:
        cluster.kubectl("delete", "md", ONE, "-n", ns, "--wait=false")
    wait_for("the one-pod reference's pod gone (its GPU)", lambda: not all_pods(cluster, ns, ONE), 90, 0.5)
    print(f"one pod: weight bytes {whole}; texts {texts}")
    assert list(whole) == [0] and whole[0] > 0, whole
    return texts, whole[0]


# --- 1. one server over two pods -----------------------------------------------------------------

def test_two_pod_group_serves_what_one_pod_serves_each_pod_holding_its_share(cluster, ns, operator, group,
                                                                               reference):
    want_texts, whole = reference
    rev, pods = available(cluster, ns)
    leader = env(pods[1], "MOE_LEADER_ADDRESS")
    assert leader == f"rank-0.{names.group_service_name(NAME, rev, 0)}.{ns}", leader
    texts, revisions = greedy_texts(cluster, ns, NAME)
    print(f"2-pod group {rev}: texts {texts}")
    assert texts == want_texts, (texts, want_texts)
    assert revisions == {rev}, revisions

    shares = {r: weight_bytes(pods[r]) for r in (0, 1)}
    print(f"weight bytes: one pod {whole:.0f}; rank 0's pod {shares[0]}; rank 1's pod {shares[1]}")
    assert list(shares[0]) == [0] and list(shares[1]) == [1], shares
    for r in (0, 1):
        assert 0 < shares[r][r] < whole, (r, shares[r][r], whole)
    # Every weight is somewhere: sharded ones split between the ranks, small ones (norms, router) on both.
    assert shares[0][0] + shares[1][1] >= whole, (shares, whole)

    for path, body in (("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}]}),
                       (f"/v2/models/{NAME}/generate", {"text_input": "x"}),
                       (f"/v2/models/{NAME}/infer", {"inputs": []}),
                       ("/v1/models", None)):
        code, _, text = http(pod_url(pods[1], path), body, timeout=10)
        assert code == 404 and "rank 0" in text, (path, code, text)
    assert http(pod_url(pods[1], "/v2/health/ready"), timeout=10)[0] == 200


# --- 2. a lost rank re-creates the whole group ----------------------------------------------------

def container_pid(pod):
    """The local node's process of the pod's runtime container (its containerID is devcluster://PID)."""
    cid = pod["status"]["containerStatuses"][0]["containerID"]
    assert cid.startswith("devcluster://"), cid
    return int(cid.removeprefix("devcluster://"))


def group_restarting_events(cluster, ns):
    """uid -> (count, message) of the ModelDeployment's GroupRestarting Events."""
    items = get(cluster, "events", "-n", ns, "--field-selector",
                f"involvedObject.name={NAME},reason={reasons.GROUP_RESTARTING}")["items"]
    return {e["metadata"]["uid"]: (e.get("count") or 1, e["message"]) for e in items}


def new_events(cluster, ns, before):
    """The messages of GroupRestarting Events posted (or repeated) since `before`."""
    return [message for key, (count, message) in group_restarting_events(cluster, ns).items()
            if count > before.get(key, (0, ""))[0]]


def lose_rank_1(cluster, ns, reference, how):
    """Loses rank 1 `how` ("kill": its process; "delete": its pod, with grace 0); checks the group
    leaves rotation at once, says so, comes back whole (new pods for both ranks) and serves."""
    rev, pods = available(cluster, ns)
    before = {uid(p) for p in pods.values()}
    events_before = group_restarting_events(cluster, ns)
    if how == "kill":
        pid = container_pid(pods[1])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--node-rank" in argv and argv[argv.index(b"--node-rank") + 1] == b"1", argv
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    else:
        started = time.monotonic()
        cluster.kubectl("delete", "pod", pods[1]["metadata"]["name"], "-n", ns, "--grace-period=0", "--force",
                        "--wait=false")

    def leader_out_of_rotation():
        leader = [p for p in all_pods(cluster, ns) if uid(p) == uid(pods[0])]
        assert leader, "rank 0's pod was deleted before its in-rotation label went false"
        return not in_rotation(leader[0])
    wait_for("rank 0's in-rotation label false", leader_out_of_rotation, 30, 0.05)
    left = time.monotonic() - started
    events = wait_for("a GroupRestarting Event", lambda: new_events(cluster, ns, events_before), 30, 0.2)
    print(f"rank 1 lost ({how}): group out of rotation after {left:.2f}s; event: {events[0]}")
    assert left < OUT_OF_ROTATION_S, f"the group left rotation {left:.1f}s after rank 1 was lost"
    assert all(f"replica group {labels(pods[0])[names.LABEL_REPLICA]} of revision {rev} lost rank 1 " in e
               for e in events), events

    # Until the group serves again, whatever else happens to the old pods meanwhile (rank 0 exits
    # once its peer is gone, and restarts), the status keeps naming the rank that was lost.
    degraded = set()

    def serving_again():
        s = status(cluster, ns)
        d = condition(s, "Degraded")
        if d.get("status") == "True":
            degraded.add((d["reason"], d["message"]))
        whole = only(all_pods(cluster, ns), rev, 2)
        return whole if (condition(s, "Available").get("status") == "True" and s.get("readyReplicas") == 1
                         and s.get("stableRevision") == rev) else None
    new = wait_for("the group re-created whole and serving, the old pods gone", serving_again, LOADS, 0.2)
    print(f"rank 1 lost ({how}): Degraded meanwhile: {sorted(degraded)}")
    restarting = [message for reason, message in degraded if reason == reasons.GROUP_RESTARTING]
    assert all(f"of revision {rev} lost rank 1 " in message for message in restarting), restarting
    assert not before & {uid(p) for p in new.values()}, "not every rank's pod was re-created"
    texts, revisions = greedy_texts(cluster, ns, NAME)
    assert texts == reference[0] and revisions == {rev}, (texts, reference[0], revisions)
    s = status(cluster, ns)
    assert condition(s, "Degraded").get("status") != "True", condition(s, "Degraded")
    print(f"rank 1 lost ({how}): serving again after {time.monotonic() - started:.1f}s")


def test_killing_rank_1_takes_the_group_out_of_rotation_and_re_creates_both_pods(cluster, ns, operator, group,
                                                                                  reference):
    lose_rank_1(cluster, ns, reference, "kill")


def test_deleting_rank_1_pod_re_creates_the_whole_group(cluster, ns, operator, group, reference):
    lose_rank_1(cluster, ns, reference, "delete")


# --- 3. a canary and a rollback under load --------------------------------------------------------

def test_canary_and_rollback_of_a_two_pod_group_under_load_fail_no_request(cluster, ns, operator, group,
                                                                            reference):
    a, _ = available(cluster, ns)
    port = service_port(cluster.state_dir, ns, NAME)
    marks = {}
    with Load(f"127.0.0.1:{port}", NAME, rate=4, workers=3, max_seconds=540, max_requests=4000) as load:
        wait_for("answers", lambda: load.counts()[1] >= 5, 60, 0.2)
        marks["canary"] = time.time()
        cluster.apply(deployment(ns, variant="b"))
        b = new_revision(cluster, ns, a)
        at_the_pause(cluster, ns, stable=a, canary=b)
        marks["pause"] = time.time()
        wait_for("answers of both revisions at the pause", lambda: (lambda seen: seen.get(a, 0) >= 3
                 and seen.get(b, 0) >= 3)(by_revision(started_after(load.served(), marks["pause"]))), 90, 0.2)
        marks["promote"] = time.time()
        print(moe(cluster, "promote", NAME, "-n", ns))
        available(cluster, ns)
        assert status(cluster, ns)["stableRevision"] == b
        marks["promoted"] = time.time()
        wait_for("answers after the promotion", lambda: len(started_after(load.served(), marks["promoted"])) >= 10,
                 60, 0.2)

        marks["second canary"] = time.time()
        cluster.apply(deployment(ns, variant="c"))
        c = new_revision(cluster, ns, b)
        at_the_pause(cluster, ns, stable=b, canary=c)
        marks["second pause"] = time.time()
        wait_for("answers of both revisions at the second pause", lambda: (lambda seen: seen.get(b, 0) >= 3
                 and seen.get(c, 0) >= 3)(by_revision(started_after(load.served(), marks["second pause"]))), 90, 0.2)
        marks["abort"] = time.time()
        print(moe(cluster, "abort", NAME, "-n", ns))
        state = wait_for("the abort", lambda: (status(cluster, ns).get("rollout") or {}).get("aborted"), 30, 0.2)
        assert state["reason"] == "AbortedByUser", state
        wait_for("revision b alone again", lambda: only(all_pods(cluster, ns), b, 2), LOADS, 0.5)
        marks["rolled back"] = time.time()
        wait_for("answers after the rollback", lambda: len(started_after(load.served(), marks["rolled back"])) >= 10,
                 60, 0.2)

    results = load.served()
    failed, total = load.counts()

    def stage(first, last):
        return by_revision([r for r in results if r.at - r.seconds >= marks[first] and
                            (last is None or r.at <= marks[last])])
    stages = {"before the canary": by_revision([r for r in results if r.at <= marks["canary"]]),
              "at the pause": stage("pause", "promote"),
              "after the promotion": stage("promoted", "second canary"),
              "at the second pause": stage("second pause", "abort"),
              "after the rollback": stage("rolled back", None)}
    print(f"canary and rollback of a 2-pod group: {total} requests, {failed} failed; a={a} b={b} c={c}; "
          f"answers by stage and revision: {stages}")
    assert failed == 0 and total > 40, (failed, total, load.errors())
    assert set(stages["before the canary"]) == {a}, stages
    assert set(stages["at the pause"]) == {a, b}, stages
    assert set(stages["after the promotion"]) == {b}, stages
    assert set(stages["at the second pause"]) == {b, c}, stages
    assert set(stages["after the rollback"]) == {b}, stages
    # Nothing served but the revisions of each moment.
    assert set(by_revision(results)) == {a, b, c}, by_revision(results)
