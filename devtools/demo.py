"""`python -m devtools.demo` (`make demo`): a bad revision rolled back on a latency alert, then a
good one promoted through its canary steps, on the local cluster, under steady load.

devcluster up --monitoring -> the operator (alerts token in a Secret, Alertmanager's webhook pointed at
it, a latency alert rule in Prometheus) -> examples/rollout-canary.yaml -> load from tritonclient
through the Service -> a revision with injected latency starts as a canary -> the rule fires ->
Alertmanager posts -> rollback -> a good revision -> promoted -> the summary line. The cluster and
the operator keep running afterwards for a look around.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml
from moe_operator.api import names
from moe_operator.api.timestamps import epoch

from devcluster import DEFAULT_STATE_DIR, DevCluster
from devtools.harness import CRD_FILE, ROOT, free_port
from devtools.loadgen import Load, service_port

NAMESPACE = "moe-demo"
EXAMPLE = ROOT / "examples" / "rollout-canary.yaml"
TOKEN_SECRET = "moe-operator-alerts"
INJECTED_LATENCY_MS = 3000
ALERT_THRESHOLD_SECONDS = 2.5
ALERT_NAME = "MoECanaryLatencyHigh"


def alert_rules(namespace: str = NAMESPACE) -> dict[str, Any]:
    """The latency alert: the canary's p99 end-to-end latency over the last 10 s above the threshold,
    labelled so the operator knows which ModelDeployment and revision it names."""
    by = "namespace, serving_moe_dev_deployment, serving_moe_dev_revision, le"
    expr = (f"histogram_quantile(0.99, sum by ({by}) (rate(moe_e2e_request_latency_seconds_bucket"
            f"{{namespace=\"{namespace}\",serving_moe_dev_track=\"canary\"}}[10s]))) > {ALERT_THRESHOLD_SECONDS}")
    return {"groups": [{"name": "moe-rollouts", "rules": [{
        "alert": ALERT_NAME, "expr": expr,
        "labels": {"severity": "page", "track": "canary",
                   "modeldeployment": "{{ $labels.serving_moe_dev_deployment }}",
                   "revision": "{{ $labels.serving_moe_dev_revision }}"},
        "annotations": {"summary": "canary p99 latency {{ $value | humanizeDuration }} above "
                                   f"{ALERT_THRESHOLD_SECONDS}s"},
    }]}]}


class Demo:
    namespace = NAMESPACE

    def __init__(self, out=sys.stdout):
        self.cluster = DevCluster(DEFAULT_STATE_DIR)
        self.out = out
        self.started = time.monotonic()
        self.manifest = yaml.safe_load(EXAMPLE.read_text())
        self.name = self.manifest["metadata"]["name"]
        self.model = self.manifest["spec"]["model"]["servedName"]
        self.base_args = list(self.manifest["spec"]["runtime"]["args"])

    @property
    def operator_file(self) -> str:
        """Where the demo's operator is recorded (and its scrape target): one per demo namespace."""
        return "moe-operator.json" if self.namespace == NAMESPACE else f"moe-operator-{self.namespace}.json"

    # --- output ----------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=self.out, flush=True)

    # --- cluster I/O -----------------------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.cluster.kubectl(*args, input=input, check=check).stdout

    def md(self) -> dict[str, Any]:
        return json.loads(self.kubectl("get", "md", self.name, "-n", self.namespace, "-o", "json"))

    def pods(self) -> list[dict[str, Any]]:
        out = json.loads(self.kubectl("get", "pods", "-n", self.namespace, "-o", "json", "-l",
                                      f"{names.LABEL_DEPLOYMENT}={self.name}"))
        return [p for p in out["items"] if not p["metadata"].get("deletionTimestamp")]

    def set_args(self, args: list[str]) -> None:
        patch = {"spec": {"runtime": {"args": args}}}
        self.kubectl("patch", "md", self.name, "-n", self.namespace, "--type", "merge", "-p", json.dumps(patch))

    def wait(self, what: str, check: Callable[[], Any], timeout: float, every: float = 1.0,
             show: Callable[[], str] | None = None) -> Any:
        deadline = time.monotonic() + timeout
        last_shown = 0.0
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: timed out after {timeout:.0f}s waiting for {what}")
            if show and time.monotonic() - last_shown >= 5:
                self.say(show())
                last_shown = time.monotonic()
            time.sleep(every)

    # --- steps -----------------------------------------------------------------------------------
    def cluster_up(self, gitops: bool = False) -> None:
        self.say("local cluster (API server, scheduler, kwok GPU nodes, local node) with Prometheus and Alertmanager"
                 + (", Flux (source-controller, kustomize-controller) and a Git server" if gitops else ""))
        self.cluster.up(gpu_nodes=2, monitoring_enabled=True, gitops_enabled=gitops)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
        self.kubectl("wait", "--for=condition=Established", "crd/modeldeployments.serving.moe.dev", "--timeout=60s")
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}}))

    def operator_up(self) -> int:
        """The operator as a background process (left running, watching only the demo's namespace so
        it never competes with another operator, e.g. a test suite's), its alerts token in a Secret
        that Alertmanager's webhook config also reads (as a file)."""
        state = self.cluster.state_dir
        record = state / self.operator_file
        if record.exists():
            try:
                os.kill(json.loads(record.read_text())["pid"], signal.SIGTERM)   # the previous demo's
            except (OSError, ValueError, KeyError):
                pass
        token = secrets.token_urlsafe(24)
        token_file = state / "monitoring" / "moe-operator-token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
        token_file.chmod(0o600)
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": TOKEN_SECRET, "namespace": self.namespace},
            "stringData": {"token": token}}))
        port = free_port()
        log = state / "logs" / "moe-operator.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "moe_operator.app.cli", "run", "--kubeconfig", str(self.cluster.kubeconfig),
               "--host", "127.0.0.1", "--port", str(port), "--namespace", self.namespace, "--resync-seconds", "10",
               "--alerts-token-secret", f"{self.namespace}/{TOKEN_SECRET}"]
        with open(log, "ab") as f:
            process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                       env={**os.environ, **self.cluster.env()})
        record.write_text(json.dumps({"pid": process.pid, "port": port}))

        def healthy() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"demo: the operator exited; see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        self.wait("the operator's /healthz", healthy, 60, every=0.3)
        self.cluster.set_alert_webhook(f"http://127.0.0.1:{port}/alerts", str(token_file))
        targets = self.cluster.targets_dir
        targets.mkdir(parents=True, exist_ok=True)
        (targets / self.operator_file).write_text(json.dumps(
            [{"targets": [f"127.0.0.1:{port}"], "labels": {"job": "moe-operator"}}]))
        (self.cluster.rules_dir / f"{self.namespace}.yml").write_text(
            yaml.safe_dump(alert_rules(self.namespace), sort_keys=False))
        self.cluster.reload_prometheus()
        self.say(f"operator running (pid {process.pid}, http://127.0.0.1:{port}: /alerts /metrics /healthz; "
                 f"log {log}); Alertmanager posts to it; alert rule {ALERT_NAME} loaded")
        return process.pid

    def manifest_with(self, args: list[str]) -> dict[str, Any]:
        """The example's ModelDeployment in the demo's namespace with these runtime args."""
        body = {**self.manifest, "metadata": {**self.manifest["metadata"], "namespace": self.namespace}}
        body["spec"] = {**body["spec"], "runtime": {**body["spec"]["runtime"], "args": list(args)}}
        return body

    def deploy(self) -> None:
        body = self.manifest_with(self.base_args)
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(body))
        self.say(f"applied {EXAMPLE.relative_to(ROOT)}: {body['spec']['replicas']} replica groups of "
                 f"{body['spec']['model']['source']} on the local node")
        self.wait_available()

    def wait_available(self) -> None:
        def available():
            conds = {c["type"]: c for c in (self.md().get("status") or {}).get("conditions") or []}
            return conds.get("Available", {}).get("status") == "True" and conds.get(
                "Progressing", {}).get("status") == "False"

        self.wait("the deployment to be Available", available, 600, show=self.progress_line)
        self.say(f"available: {self.md()['status']['readyReplicas']} replica groups ready, "
                 f"revision {self.md()['status']['stableRevision']}")

    def progress_line(self, load: Load | None = None) -> str:
        md = self.md()
        status = md.get("status") or {}
        state = status.get("rollout") or {}
        tracks: dict[str, list[str]] = {}
        for p in self.pods():
            labels = p["metadata"]["labels"]
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
            mark = "*" if labels.get(names.LABEL_IN_ROTATION) == "true" else ("+" if ready else ".")
            tracks.setdefault(labels[names.LABEL_TRACK], []).append(mark)
        pods = " ".join(f"{t}[{''.join(sorted(v))}]" for t, v in sorted(tracks.items()))
        parts = [f"phase {status.get('phase', '?')}"]
        if state.get("revision") and state.get("revision") != status.get("stableRevision"):
            parts.append(f"step {state.get('stepIndex', 0)}, weight {state.get('weight', 0)}% "
                         f"(achieved {status.get('canaryWeight', 0)}%)")
        measurements = (state.get("analysis") or {}).get("measurements") or []
        if measurements:
            f = measurements[-1].get("figures") or {}
            parts.append(f"analysis {measurements[-1]['result']}"
                         + (f" p99 {f['p99LatencyMs']:.0f}ms" if "p99LatencyMs" in f else ""))
        parts.append(f"pods {pods} (*serving +ready .loading)")
        if load:
            failed, total, p50 = load.recent(5)
            parts.append(f"load {total / 5:.1f} req/s p50 {p50 * 1000:.0f}ms" if p50 else "load waiting")
            if failed:
                parts.append(f"{failed} failed")
        return "; ".join(parts)

    def bad_revision(self, load: Load) -> tuple[float, str]:
        self.say(f"a bad revision: the same model with --inject-latency-ms {INJECTED_LATENCY_MS} "
                 "(every request 3 s slower) starts as a canary")
        stable = self.md()["status"]["stableRevision"]
        self.set_args(self.base_args + ["--inject-latency-ms", str(INJECTED_LATENCY_MS)])
        state = self.wait("the canary to start", lambda: (lambda s: s if s.get("revision") not in (None, stable)
                                                          else None)(self.md()["status"].get("rollout") or {}), 60)
        bad = state["revision"]
        self.say(f"canary revision {bad}; waiting for Prometheus' rule to fire and Alertmanager to post")

        def aborted():
            s = self.md()["status"].get("rollout") or {}
            return s if s.get("revision") == bad and s.get("aborted") and s.get("outOfRotationAt") else None

        state = self.wait("the alert to roll the canary back", aborted, 600, show=lambda: self.progress_line(load))
        a = state["aborted"]
        seconds = epoch(state["outOfRotationAt"]) - epoch(a["at"])
        after = "the alert arrived" if a.get("source") == "alert" else f"the {a.get('source')} asked"
        self.say(f"ROLLED BACK: {a['reason']} ({a.get('message')}); the canary left rotation {seconds:.2f}s "
                 f"after {after}; Degraded says why, and the revision is remembered as bad")
        return seconds, bad

    def good_revision(self, load: Load) -> str:
        self.say("a good revision (a different batch size) goes through the canary steps")
        before = self.md()["status"]["stableRevision"]
        self.set_args(self.base_args[:-1] + [str(int(self.base_args[-1]) - 2)])

        def promoted():
            status = self.md()["status"]
            return status.get("stableRevision") if status.get("stableRevision") not in (None, before) \
                and (status.get("rollout") or {}).get("completedAt") else None

        good = self.wait("the good revision to be promoted", promoted, 900, show=lambda: self.progress_line(load))
        self.say(f"PROMOTED revision {good}: the canary pods were relabelled stable (no restart)")
        return good

    def run(self) -> int:
        self.cluster_up()
        pid = self.operator_up()
        self.deploy()
        port = service_port(self.cluster.state_dir, self.namespace, self.name)
        self.say(f"steady load: KServe v2 infer with tritonclient through Service {self.namespace}/{self.name} "
                 f"(127.0.0.1:{port})")
        load = Load(f"127.0.0.1:{port}", self.model, rate=6.0, workers=8, max_seconds=1500, max_requests=10_000)
        with load:
            self.wait("the first answers", lambda: load.counts()[1] >= 10, 120, every=0.5)
            rollback_seconds, _bad = self.bad_revision(load)
            good = self.good_revision(load)
        failed, total = load.counts()
        if failed:
            self.say(f"failed requests, last ones: {load.errors()}")
        print(f"demo: rollback {rollback_seconds:.2f}s after the alert, {failed} failed requests of {total}; "
              f"promoted revision {good}", flush=True)
        kubeconfig = self.cluster.kubeconfig
        print(f"the cluster and the operator (pid {pid}) keep running; look around with: "
              f"export KUBECONFIG={kubeconfig} PATH={ROOT / '.venv' / 'bin'}:$PATH; "
              f"kubectl moe status {self.name} -n {self.namespace} --watch   "
              f"(stop: kill {pid}; python -m devcluster down)", flush=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n")[0])
    args.add_argument("--gitops", action="store_true",
                      help="drive the story from Git: Flux syncs the ModelDeployment from the devcluster's "
                           "repository (make demo-gitops; devtools/demo_gitops.py)")
    if args.parse_args(argv).gitops:
        from devtools.demo_gitops import GitOpsDemo

        return GitOpsDemo().run()
    return Demo().run()


if __name__ == "__main__":
    sys.exit(main())
