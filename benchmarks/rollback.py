"""`python -m benchmarks.rollback [--trials 12]`: rollback latency, from an alert's arrival at
the operator's /alerts to the last canary pod out of rotation, over repeated canaries.

Each trial rolls a new revision out as a canary (pods on the devcluster's simulated GPU nodes, so the
measurement is the operator's reaction, not model loading), waits until the canary serves, posts an
Alertmanager payload naming it, and watches the pods until none of that revision is in rotation.
Prints each trial, then p50 and p95 (client-observed, and as the operator's own histogram recorded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
import uuid
from typing import Any

from kubernetes import client, config
from moe_operator.api import names

from devcluster.testing import running_cluster
from devtools.harness import install_crd, running_operator, wait_for

NAMESPACE = "moe-bench"
NAME = "bench"


def deployment(trial: int) -> dict[str, Any]:
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": NAME, "namespace": NAMESPACE},
            "spec": {"replicas": 4, "model": {"source": "builtin:tiny-deepseek-v3"},
                     "runtime": {"env": [{"name": "BENCH_TRIAL", "value": str(trial)}]},
                     "resources": {"gpus": 1},
                     "scheduling": {"nodeSelector": {"devcluster.serving.moe.dev/simulated": "true"}},
                     "rollout": {"strategy": "Canary", "maxSurgeGPUs": 2,
                                 "canary": {"steps": [{"setWeight": 50}, {"pause": {}}]},
                                 "analysis": {"slo": {}}}}}


def payload(revision: str) -> bytes:
    labels = {"alertname": "MoECanaryLatencyHigh", "namespace": NAMESPACE, "modeldeployment": NAME,
              "revision": revision, "track": "canary"}
    return json.dumps({"version": "4", "status": "firing", "receiver": "moe-operator", "groupKey": "{}:{}",
                       "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": "bench"},
                                   "startsAt": "2026-01-01T00:00:00Z", "fingerprint": uuid.uuid4().hex[:16]}]}
                      ).encode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rollback")
    p.add_argument("--trials", type=int, default=12)
    args = p.parse_args(argv)

    with running_cluster(monitoring=False) as cluster:
        install_crd(cluster)
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        token = uuid.uuid4().hex
        token_file = cluster.state_dir / "bench-alerts-token"
        token_file.write_text(token)

        def get(*a: str) -> dict[str, Any]:
            return json.loads(cluster.kubectl("get", "-o", "json", *a).stdout)

        def status() -> dict[str, Any]:
            return get("md", NAME, "-n", NAMESPACE).get("status") or {}

        core = client.CoreV1Api(config.new_client_from_config(config_file=str(cluster.kubeconfig)))

        def canary_rotating(revision: str) -> int:
            selector = (f"{names.LABEL_DEPLOYMENT}={NAME},{names.LABEL_REVISION}={revision},"
                        f"{names.LABEL_IN_ROTATION}=true")
            return len(core.list_namespaced_pod(NAMESPACE, label_selector=selector).items)

        with running_operator(cluster, namespaces=[NAMESPACE], resync_seconds=5,
                              extra_args=("--alerts-token-file", str(token_file))) as op:
            cluster.apply(deployment(0))
            wait_for("the stable revision", lambda: status().get("readyReplicas") == 4
                     and status().get("stableRevision"), 120, 0.2)
            seen: list[float] = []
            for trial in range(1, args.trials + 1):
                cluster.apply(deployment(trial))
                revision = wait_for("the canary in rotation", lambda: (lambda s: s.get("currentRevision")
                                    if (s.get("rollout") or {}).get("stepIndex") == 1 and s.get("canaryWeight") == 50
                                    else None)(status()), 120, 0.1)
                wait_for("canary pods labelled in rotation", lambda r=revision: canary_rotating(r) > 0, 30, 0.05)
                request = urllib.request.Request(f"http://127.0.0.1:{op.port}/alerts", data=payload(revision),
                                                 headers={"Authorization": f"Bearer {token}",
                                                          "Content-Type": "application/json"})
                t0 = time.monotonic()
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 200, response.read()
                wait_for("the canary out of rotation", lambda r=revision: canary_rotating(r) == 0, 30, 0.005)
                seen.append(time.monotonic() - t0)
                print(f"trial {trial:2d}: revision {revision} out of rotation {seen[-1] * 1000:7.1f} ms after the alert",
                      flush=True)
            # The operator records a rollback once its whole reconcile is done, a little after the
            # relabel the watch above saw: wait for the last one to be counted.
            try:
                wait_for("the operator to count every rollback", lambda: op.metric(
                    "moe_operator_rollback_latency_seconds_count") >= len(seen), 10, 0.1)
            except AssertionError:
                pass
            count = op.metric("moe_operator_rollback_latency_seconds_count")
            total = op.metric("moe_operator_rollback_latency_seconds_sum")
        print(f"rollback latency over {len(seen)} trials (alert posted -> last canary pod out of rotation, "
              f"seen through the API): p50 {percentile(seen, 0.5) * 1000:.0f} ms, p95 {percentile(seen, 0.95) * 1000:.0f} ms, "
              f"max {max(seen) * 1000:.0f} ms, mean {statistics.mean(seen) * 1000:.0f} ms")
        if count:
            print(f"operator's histogram moe_operator_rollback_latency_seconds: {int(count)} rollbacks, "
                  f"mean {total / count * 1000:.0f} ms (alert received -> label write done)")
        cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
