"""Autoscaling end to end: the real operator and API server, scheduler and kwok GPU nodes, and real
runtime pods on the local node under bounded load.

- Under load (runtime pods with one sequence slot each, so requests queue in the engine), 1 -> 2
  groups, no change while the load holds, back to 1 after it stops, within the configured windows.
- A scale-up the scheduler cannot place sets ScalingLimited/InsufficientGPUCapacity and asks for no
  more; during a canary stable and canary follow the weight. These use metric PromQL against the
  devcluster's Prometheus with a constant query (`vector(N)`), a signal under the test's control, on
  simulated (kwok) pods.
- With no spec.autoscaling, `kubectl scale` and an HPA targeting the ModelDeployment (its scale
  subresource) reach the pods. The devcluster has no metrics-server: the HPA cannot measure, but it
  reads the scale subresource and enforces its minReplicas through it.
"""

import json
import time

import pytest
from moe_operator.api import names

from devtools.harness import wait_for
from devtools.loadgen import Load, service_port

pytestmark = pytest.mark.e2e

SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}
LOCAL = {"devcluster.serving.moe.dev/local": "true"}


def md(name, ns, replicas=None, node=SIMULATED, gpus=1, autoscaling=None, args=(), **spec):
    """A manifest as a user (or Git) holds it: with spec.autoscaling, no spec.replicas (the
    autoscaler owns it; applying a count would take it back, as Argo CD would)."""
    body = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": ns},
            "spec": {"model": {"source": "builtin:tiny-mixtral", "dtype": "float32"},
                     "runtime": {"args": list(args)}, "resources": {"gpus": gpus},
                     "scheduling": {"nodeSelector": node}, **spec}}
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    if autoscaling is not None:
        body["spec"]["autoscaling"] = autoscaling
    return body


def get(cluster, *args):
    return json.loads(cluster.kubectl("get", "-o", "json", *args).stdout)


def obj(cluster, ns, name):
    return get(cluster, "md", name, "-n", ns)


def condition(body, ctype):
    return next((c for c in (body.get("status") or {}).get("conditions") or () if c["type"] == ctype), None)


def pods(cluster, ns, name):
    return get(cluster, "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={name}")["items"]


def live_groups(cluster, ns, name):
    return {(p["metadata"]["labels"][names.LABEL_REVISION], p["metadata"]["labels"][names.LABEL_REPLICA])
            for p in pods(cluster, ns, name) if not p["metadata"].get("deletionTimestamp")}


class ReplicaWatch:
    """spec.replicas over time, polled (every call to `poll` appends one reading)."""

    def __init__(self, cluster, ns, name):
        self.cluster, self.ns, self.name = cluster, ns, name
        self.readings: list[tuple[float, int, int]] = []     # (time, spec.replicas, readyReplicas)

    def poll(self):
        body = obj(self.cluster, self.ns, self.name)
        reading = (time.monotonic(), body["spec"]["replicas"], (body.get("status") or {}).get("readyReplicas", 0))
        self.readings.append(reading)
        return body

    def changes(self, since: float) -> int:
        counts = [n for t, n, _ in self.readings if t >= since]
        return sum(1 for a, b in zip(counts, counts[1:], strict=False) if a != b)


def test_scales_up_under_load_holds_steady_and_returns_to_min(cluster, ns, operator):
    name = "queue"
    down_window = 15
    cluster.apply(md(name, ns, node=LOCAL, gpus=0, args=("--max-num-seqs", "1"), autoscaling={
        "minReplicas": 1, "maxReplicas": 3, "metric": "requestsWaiting", "target": 2, "interval": "1s",
        "scaleUpStabilization": "2s", "scaleDownStabilization": f"{down_window}s"}))
    cluster.kubectl("wait", "--for=condition=Available", f"md/{name}", "-n", ns, "--timeout=180s", timeout=200)
    watch = ReplicaWatch(cluster, ns, name)
    port = service_port(cluster.state_dir, ns, name)
    # Five clients always in flight, each asking for 48 tokens, against one sequence slot per group:
    # one group has ~4 waiting; the autoscaler wants ceil(5 / (1 + 2)) = 2 groups. On 2 groups the
    # pressure (5 / 3 = 1.67 groups) stays inside the 10% tolerance band, also when the two pods'
    # scrapes, taken a few ms apart, count a request that moved between them twice (6 / 3 = 2.0).
    # Six clients would sit on the band's edge (6 / 3 = 2.0 groups), where one double count scales up.
    load = Load(f"127.0.0.1:{port}", name, rate=200.0, workers=5, max_tokens=48, max_seconds=240,
                max_requests=20_000, timeout=60)
    with load:
        started = time.monotonic()
        wait_for("a scale-up to 2 groups", lambda: watch.poll()["spec"]["replicas"] >= 2, 60, 0.5)
        decided = time.monotonic() - started
        wait_for("2 groups ready", lambda: (watch.poll().get("status") or {}).get("readyReplicas", 0) >= 2,
                 180, 0.5)
        ready = time.monotonic() - started
        status = obj(cluster, ns, name)["status"]["autoscaling"]
        assert status["lastDecision"]["reason"] == "ScaleUp" and status["lastDecision"]["to"] >= 2
        # Steady load: no change over a window twice the scale-down window.
        steady_from = time.monotonic()
        deadline = steady_from + 2 * down_window
        while time.monotonic() < deadline:
            watch.poll()
            time.sleep(0.5)
        assert watch.changes(steady_from) == 0, watch.readings
        assert obj(cluster, ns, name)["spec"]["replicas"] == 2
        stopped = time.monotonic()          # no new requests from here (those in flight finish)
        load.stop()
    failed, total = load.counts()
    assert total > 0 and failed == 0, load.errors()
    wait_for("back to 1 group", lambda: watch.poll()["spec"]["replicas"] == 1, down_window + 30, 0.5)
    back = time.monotonic() - stopped
    assert back >= down_window - 2          # not before the window
    wait_for("one group left", lambda: len(live_groups(cluster, ns, name)) == 1, 60, 0.5)
    print(f"\nautoscaling e2e: decision {decided:.1f}s and ready {ready:.1f}s after the load step; "
          f"back to 1 {back:.1f}s after it stopped (window {down_window}s)")


def test_unschedulable_scale_up_sets_scaling_limited_and_stops(cluster, ns, operator):
    name = "short"
    # A group takes 8 GPUs; only devcluster-gpu-0 (8 GPUs) may be used: one group fits.
    node = {**SIMULATED, "kubernetes.io/hostname": "devcluster-gpu-0"}
    auto = {"minReplicas": 1, "maxReplicas": 6, "metric": "PromQL", "query": "vector(4)", "target": 4,
            "interval": "1s", "scaleDownStabilization": "60s",
            "prometheus": {"url": cluster.prometheus_url}}
    cluster.apply(md(name, ns, node=node, gpus=8, autoscaling=auto))
    cluster.kubectl("wait", "--for=condition=Available", f"md/{name}", "-n", ns, "--timeout=60s", timeout=80)
    auto["query"] = "vector(12)"                      # 3 groups' worth
    cluster.apply(md(name, ns, node=node, gpus=8, autoscaling=auto))

    def limited():
        c = condition(obj(cluster, ns, name), "ScalingLimited")
        return c if c and c["status"] == "True" and c["reason"] == "InsufficientGPUCapacity" else None

    cond = wait_for("ScalingLimited=True/InsufficientGPUCapacity", limited, 30, 0.3)
    assert "Insufficient nvidia.com/gpu" in cond["message"]
    body = obj(cluster, ns, name)
    assert body["spec"]["replicas"] == 3
    # More load: it asks for no more while the groups pend.
    auto["query"] = "vector(24)"
    cluster.apply(md(name, ns, node=node, gpus=8, autoscaling=auto))
    watch = ReplicaWatch(cluster, ns, name)
    since = time.monotonic()
    deadline = since + 8
    while time.monotonic() < deadline:
        body = watch.poll()
        time.sleep(0.5)
    assert watch.changes(since) == 0 and body["spec"]["replicas"] == 3
    assert body["status"]["autoscaling"]["reason"] == "InsufficientGPUCapacity"
    assert body["status"]["autoscaling"]["pendingReplicas"] == 2


def test_canary_keeps_its_proportion_while_scaling(cluster, ns, operator):
    name = "canary"
    auto = {"minReplicas": 1, "maxReplicas": 8, "metric": "PromQL", "query": "vector(8)", "target": 4,
            "interval": "1s", "scaleDownStabilization": "60s", "prometheus": {"url": cluster.prometheus_url}}
    rollout = {"maxSurgeGPUs": 2, "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]}}
    body = md(name, ns, autoscaling=auto, rollout=rollout)
    cluster.apply(body)
    wait_for("2 groups ready", lambda: obj(cluster, ns, name).get("status", {}).get("readyReplicas") == 2, 60, 0.3)
    wait_for("a stable revision", lambda: obj(cluster, ns, name)["status"].get("stableRevision"), 60, 0.3)
    body["spec"]["model"]["dtype"] = "float16"        # a new revision: the canary starts at 50 %
    cluster.apply(body)

    def rotating():
        counts = {}
        for p in pods(cluster, ns, name):
            labels = p["metadata"]["labels"]
            if labels.get(names.LABEL_IN_ROTATION) == "true" and not p["metadata"].get("deletionTimestamp"):
                counts[labels[names.LABEL_TRACK]] = counts.get(labels[names.LABEL_TRACK], 0) + 1
        return counts

    wait_for("1 stable + 1 canary in rotation", lambda: rotating() == {"stable": 1, "canary": 1}, 60, 0.3)
    body["spec"]["autoscaling"]["query"] = "vector(16)"    # 4 groups' worth
    cluster.apply(body)
    wait_for("2 stable + 2 canary in rotation", lambda: rotating() == {"stable": 2, "canary": 2}, 60, 0.3)
    status = obj(cluster, ns, name)["status"]
    assert status["autoscaling"]["split"] == {"stable": 2, "canary": 2}
    assert status.get("canaryWeight") == 50


def test_kubectl_scale_and_an_hpa_reach_the_pods(cluster, ns, operator):
    name = "manual"
    cluster.apply(md(name, ns, replicas=1))
    wait_for("1 group", lambda: len(live_groups(cluster, ns, name)) == 1, 60, 0.3)
    cluster.kubectl("scale", f"md/{name}", "-n", ns, "--replicas=2")
    wait_for("2 groups after kubectl scale", lambda: len(live_groups(cluster, ns, name)) == 2, 60, 0.3)
    scale_path = f"/apis/{names.API_VERSION}/namespaces/{ns}/modeldeployments/{name}/scale"

    def scale():
        return json.loads(cluster.kubectl("get", "--raw", scale_path).stdout)

    assert scale()["spec"]["replicas"] == 2
    wait_for("status.replicas 2 in the scale subresource", lambda: scale()["status"].get("replicas") == 2, 30, 0.3)
    assert f"{names.LABEL_DEPLOYMENT}={name}" in scale()["status"]["selector"]
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"scaleTargetRef": {"apiVersion": names.API_VERSION, "kind": names.KIND, "name": name},
                    "minReplicas": 3, "maxReplicas": 4,
                    "metrics": [{"type": "Pods", "pods": {"metric": {"name": "moe_num_requests_waiting"},
                                                          "target": {"type": "AverageValue", "averageValue": "4"}}}]}}
    cluster.apply(hpa)
    # No metrics pipeline here: the HPA cannot measure, but it reads the scale subresource and
    # enforces minReplicas through it, and the operator turns that into groups.
    wait_for("3 groups after the HPA's minReplicas", lambda: len(live_groups(cluster, ns, name)) == 3, 90, 0.5)

    def able():
        h = get(cluster, "hpa", name, "-n", ns)
        c = next((c for c in (h.get("status") or {}).get("conditions") or () if c["type"] == "AbleToScale"), None)
        return c if c and c["status"] == "True" else None

    assert wait_for("the HPA's AbleToScale", able, 60, 0.5)["reason"] in ("SucceededGetScale", "SucceededRescale",
                                                                          "ReadyForNewScale")
    cluster.kubectl("delete", "hpa", name, "-n", ns)
