"""Benchmark: time from a load step to the built-in autoscaler's scale-up decision, and to the new
replica group ready, on the devcluster with real runtime pods on the local node.

    python -m benchmarks.autoscale [--trials 3] [--interval 1s] [--down-window 10s]

Each trial: one group serving, idle; a step of bounded load (closed loop, `--clients` requests in
flight against runtime pods that run one sequence at a time, so requests queue in the engine); the
autoscaler decides 2 groups; the new group loads the model and enters rotation; the load stops and the
deployment returns to 1 group before the next trial. Prints one line per trial and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid

from moe_operator.api import names
from moe_operator.api.timestamps import epoch

from devcluster.testing import running_cluster
from devtools.harness import install_crd, running_operator, wait_for
from devtools.loadgen import Load, service_port

LOCAL = {"devcluster.serving.moe.dev/local": "true"}


def manifest(name: str, namespace: str, interval: str, down_window: str) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": 1, "model": {"source": "builtin:tiny-mixtral", "dtype": "float32"},
                     "runtime": {"args": ["--max-num-seqs", "1"]}, "resources": {"gpus": 0},
                     "scheduling": {"nodeSelector": LOCAL},
                     "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "metric": "requestsWaiting", "target": 2,
                                     "interval": interval, "scaleUpStabilization": "0s",
                                     "scaleDownStabilization": down_window}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.autoscale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--interval", default="1s", help="spec.autoscaling.interval")
    parser.add_argument("--down-window", default="10s", help="spec.autoscaling.scaleDownStabilization")
    parser.add_argument("--clients", type=int, default=6, help="requests in flight during the step")
    args = parser.parse_args(argv)

    name, namespace = "bench-autoscale", f"bench-as-{uuid.uuid4().hex[:6]}"
    decided, ready = [], []
    with running_cluster(monitoring=False) as cluster:
        install_crd(cluster)
        cluster.kubectl("create", "namespace", namespace)
        try:
            with running_operator(cluster, namespaces=[namespace], resync_seconds=5.0):
                cluster.apply(manifest(name, namespace, args.interval, args.down_window))
                cluster.kubectl("wait", "--for=condition=Available", f"md/{name}", "-n", namespace,
                                "--timeout=300s", timeout=320)
                port = service_port(cluster.state_dir, namespace, name)

                def get() -> dict:
                    return json.loads(cluster.kubectl("get", "md", name, "-n", namespace, "-o", "json").stdout)

                for trial in range(1, args.trials + 1):
                    wait_for("one idle group", lambda: get()["spec"]["replicas"] == 1
                             and get()["status"].get("readyReplicas") == 1, 120, 0.5)
                    load = Load(f"127.0.0.1:{port}", name, rate=500.0, workers=args.clients, max_tokens=48,
                                max_seconds=300, max_requests=50_000, timeout=60)
                    step = time.time()
                    with load:
                        wait_for("the scale-up decision", lambda: get()["spec"]["replicas"] >= 2, 120, 0.2)
                        last = get()["status"].get("autoscaling", {}).get("lastDecision") or {}
                        at = epoch(last.get("at")) or time.time()
                        decided.append(at - step)
                        wait_for("the new group ready", lambda: get()["status"].get("readyReplicas", 0) >= 2,
                                 300, 0.2)
                        ready.append(time.time() - step)
                        failed, total = load.counts()
                    print(f"trial {trial}: decision {decided[-1]:.2f}s, new group ready {ready[-1]:.2f}s "
                          f"after the load step ({total} requests, {failed} failed)", flush=True)
        finally:
            cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    print(f"bench_autoscale: {len(decided)} trials, interval {args.interval}: load step -> scale-up decision "
          f"median {statistics.median(decided):.2f}s (max {max(decided):.2f}s); -> new group ready median "
          f"{statistics.median(ready):.2f}s (max {max(ready):.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
