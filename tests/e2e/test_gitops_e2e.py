"""GitOps for real: Flux's source-controller and kustomize-controller (devcluster `--gitops`) sync
ModelDeployments from a Git repository on loopback into the devcluster, where the operator rolls them
out with real runtime pods on the local node (and simulated ones on kwok nodes).

- A committed ModelDeployment is applied by Flux and becomes Available; a bad commit's canary is
  rolled back on a latency alert while Flux keeps reconciling every 5 s: the Kustomization stays
  Ready, the bad revision does not come back, and Flux writes nothing to the ModelDeployment (counted
  from a watch of the object's managedFields); a revert commit brings the stable spec back through
  Flux with no new rollout; an abort (`kubectl moe abort`) holds the same way; a fixing commit is
  rolled out and promoted. `kubectl moe undo` on the Flux-managed object refuses and says to revert.
- The autoscaler against Git: with spec.replicas left out of Git its scale is never reverted; with
  it in Git Flux puts the Git value back (a drift fight); with it in Git and the Kustomization's
  `ignore: /spec/replicas` the autoscaler keeps it. What the API server records as spec.replicas'
  owner after a /scale write is checked, as docs/gitops.md states it.
- Flux's health checks: `wait: true` alone reads kstatus (observedGeneration; a ModelDeployment has
  no Ready/Reconciling/Stalled condition) and reports Ready for a ModelDeployment that is not
  Available; the `healthCheckExprs` of examples/gitops/flux.yaml wait for Available.
"""

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml
from moe_operator.api import names
from moe_operator.api.timestamps import epoch

from devcluster.testing import running_cluster
from devtools import gitrepo
from devtools.gitrepo import Checkout, flux_writes, wait_applied
from devtools.harness import ROOT, install_crd, wait_for
from devtools.loadgen import Load, service_port

# The first use builds Flux (about 13 minutes on 2 cores): the module's first test may take that long.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

LOCAL = {"devcluster.serving.moe.dev/local": "true"}
SIMULATED = {"devcluster.serving.moe.dev/simulated": "true"}
SYNC_SECONDS = 5          # devcluster.cluster.gitops.SYNC_INTERVAL
NAME = "chat"


@pytest.fixture(scope="module")
def cluster():
    """The devcluster with monitoring and Flux (started, or added to a running one), the CRD installed."""
    with running_cluster(monitoring=True, gitops=True) as running:
        install_crd(running)
        yield running


@pytest.fixture(scope="module")
def repo(cluster, ns, tmp_path_factory):
    """A repository of this module's own, synced by Kustomization flux-system/<ns>, and a checkout of it."""
    url = cluster.devcluster.add_gitops_repository(ns)
    checkout = Checkout.clone(url, tmp_path_factory.mktemp("git") / ns)
    yield checkout
    cluster.devcluster.remove_gitops_repository(ns)


def get(cluster, *args):
    return json.loads(cluster.kubectl("get", "-o", "json", *args).stdout)


def md_of(cluster, ns, name=NAME):
    return get(cluster, "md", name, "-n", ns, "--show-managed-fields")


def condition(obj, ctype):
    return next((c for c in (obj.get("status") or {}).get("conditions") or () if c["type"] == ctype), {})


def pods(cluster, ns, name=NAME):
    items = get(cluster, "pods", "-n", ns, "-l", f"{names.LABEL_DEPLOYMENT}={name}")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def serving(ns, args=()):
    """The manifest in Git: one replica group of real runtime pods on the local node (no GPUs: the
    local node's are shared with whatever else runs there), a canary with a timed pause."""
    return {
        "apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": NAME, "namespace": ns},
        "spec": {
            "replicas": 1,
            "model": {"source": "builtin:tiny-mixtral", "servedName": NAME, "dtype": "float32"},
            "runtime": {"args": ["--device", "cpu", "--max-num-seqs", "8", *args],
                        "startupTimeoutSeconds": 300, "terminationGracePeriodSeconds": 10},
            "resources": {"gpus": 0, "cpu": "100m", "memory": "1Gi"},
            "scheduling": {"nodeSelector": LOCAL},
            "rollout": {"strategy": "Canary", "maxSurgeGPUs": 0,
                        "canary": {"steps": [{"setWeight": 50}, {"pause": {"duration": "30s"}}]},
                        # 10 s: at 50% of 4 requests/s an interval holds the 10 requests a verdict needs.
                        "analysis": {"interval": "10s", "slo": {"p99LatencyMs": 4000, "maxErrorRate": 0.2}}},
        },
    }


def latency_rule(ns):
    return {"name": f"gitops-{ns}", "rules": [{
        "alert": "MoECanaryLatencyHigh",
        "expr": 'histogram_quantile(0.99, sum by (namespace, serving_moe_dev_deployment, serving_moe_dev_revision, '
                f'le) (rate(moe_e2e_request_latency_seconds_bucket{{namespace="{ns}",'
                'serving_moe_dev_track="canary"}[10s]))) > 1.5',
        "labels": {"modeldeployment": "{{ $labels.serving_moe_dev_deployment }}",
                   "revision": "{{ $labels.serving_moe_dev_revision }}", "track": "canary"},
        "annotations": {"summary": "canary p99 latency above 1.5s"}}]}


class FluxWrites:
    """Every change of the ModelDeployment as a watch sees it (`kubectl get --watch`), and among them
    the writes of Flux's field manager: the time of its managedFields entry moved (the API server sets it
    when that manager writes; another manager taking a field away shrinks the entry, not its time)."""

    def __init__(self, cluster, ns, name=NAME):
        self.events: list[dict] = []
        self.process = subprocess.Popen(
            [str(Path(cluster.env["PATH"].split(os.pathsep)[0]) / "kubectl"), "get", "md", name, "-n", ns,
             "--watch", "--output-watch-events", "--show-managed-fields", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **cluster.env})
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wait_for("the watch's first event", lambda: self.events, 30)

    def _read(self):
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.process.stdout:
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except ValueError:
                continue
            buffer = buffer.lstrip()[end:]
            obj = event.get("object") or {}
            self.events.append({"at": time.monotonic(), "rv": obj["metadata"]["resourceVersion"],
                                "generation": obj["metadata"].get("generation"), "flux": flux_writes(obj),
                                "args": (obj["spec"].get("runtime") or {}).get("args"),
                                "replicas": obj["spec"].get("replicas")})

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> list[dict]:
        """Flux's writes among the events after `mark`."""
        events = self.events[max(mark - 1, 0):]
        return [b for a, b in zip(events, events[1:], strict=False) if a["flux"] != b["flux"]]

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def kubectl_moe(cluster, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_operator.app.kubectl_plugin", *args],
                          env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=60, cwd=ROOT)


def rollout(cluster, ns):
    return (md_of(cluster, ns).get("status") or {}).get("rollout") or {}


def test_git_drives_rollout_rollback_revert_abort_and_promotion(cluster, ns, operator, token, repo):
    cluster.set_alert_webhook(f"http://127.0.0.1:{operator.port}/alerts", str(token[1]))
    cluster.add_rules(f"gitops-{ns}", [latency_rule(ns)])
    path = f"deploy/{ns}/chat.yaml"
    try:
        # 1. A committed ModelDeployment: Flux applies it, the operator makes it Available.
        committed = time.monotonic()
        first = repo.commit({path: serving(ns)}, "chat: one replica of tiny-mixtral")
        applied = wait_applied(cluster.kubectl, ns, first, timeout=60)
        print(f"commit {first[:8]} applied by Flux {applied - committed:.1f}s after the push")
        cluster.kubectl("wait", "--for=condition=Available", f"md/{NAME}", "-n", ns, "--timeout=300s", timeout=320)
        body = md_of(cluster, ns)
        stable = body["status"]["stableRevision"]
        assert body["metadata"]["labels"]["kustomize.toolkit.fluxcd.io/name"] == ns
        assert flux_writes(body), "Flux's field manager applied the object"
        stable_pods = {p["metadata"]["uid"] for p in pods(cluster, ns)}

        writes = FluxWrites(cluster, ns)
        port = service_port(cluster.state_dir, ns, NAME)
        with Load(f"127.0.0.1:{port}", NAME, rate=4, workers=6, max_seconds=900, max_requests=6000) as load:
            wait_for("answers", lambda: load.counts()[1] >= 5, 60, 0.2)
            # 2. A bad commit (every request 2.5 s slower): canary, alert, rollback.
            mark = writes.mark()
            bad = repo.commit({path: serving(ns, ["--inject-latency-ms", "2500"])}, "chat: a slow build")
            wait_applied(cluster.kubectl, ns, bad, timeout=60)
            state = wait_for("the alert to roll the canary back", lambda: (lambda s: s if s.get("aborted")
                             and s.get("outOfRotationAt") else None)(rollout(cluster, ns)), 300, 0.5)
            assert state["aborted"]["reason"] == "AlertFiring", state["aborted"]
            bad_revision = state["revision"]
            aborted_at = time.monotonic()
            print(f"rolled back {epoch(state['outOfRotationAt']) - epoch(state['aborted']['at']):.2f}s after the alert")
            # Flux reconciles every 5 s meanwhile: Ready, the bad commit applied, and it writes nothing.
            wait_for("the canary's pods to go", lambda: not [p for p in pods(cluster, ns) if
                     p["metadata"]["labels"][names.LABEL_REVISION] == bad_revision], 60, 0.5)
            hold_until = time.monotonic() + 4 * SYNC_SECONDS
            readiness = []
            while time.monotonic() < hold_until:
                k = gitrepo.kustomization(cluster.kubectl, ns)
                # Ready goes Unknown (Progressing) while each reconcile runs; never False.
                readiness.append(gitrepo.ready(k)["status"])
                assert readiness[-1] != "False", gitrepo.ready(k)
                assert gitrepo.applied_revision(k).endswith(bad)
                live = pods(cluster, ns)
                assert not [p for p in live if p["metadata"]["labels"][names.LABEL_REVISION] == bad_revision], \
                    "the aborted revision came back"
                assert rollout(cluster, ns).get("aborted"), "the abort was undone"
                time.sleep(1)
            assert readiness.count("True") > len(readiness) / 2, readiness
            after_abort = [w for w in writes.since(mark) if w["at"] > aborted_at]
            assert after_abort == [], f"Flux wrote to the ModelDeployment after the rollback: {after_abort}"
            assert len(writes.since(mark)) == 1, "one write: the bad commit's apply"
            print(f"Flux writes to the ModelDeployment from the rollback on: {len(after_abort)} "
                  f"(over {time.monotonic() - aborted_at:.0f}s, Kustomization interval {SYNC_SECONDS}s)")

            # 3. kubectl moe undo on a Flux-managed object: refused, with the Git way out.
            undo = kubectl_moe(cluster, "undo", NAME, "-n", ns)
            assert undo.returncode == 1 and "Revert the commit in Git" in undo.stderr, undo.stderr
            assert f"Flux Kustomization flux-system/{ns}" in undo.stderr

            # 4. git revert: the stable spec comes back through Flux, with no new rollout.
            mark = writes.mark()
            reverted = repo.revert(bad)
            wait_applied(cluster.kubectl, ns, reverted, timeout=60)
            wait_for("the stable revision to be current again", lambda: (lambda s: s.get("currentRevision") == stable)(
                md_of(cluster, ns)["status"]), 30, 0.3)
            hold_until = time.monotonic() + 2 * SYNC_SECONDS
            while time.monotonic() < hold_until:
                status = md_of(cluster, ns)["status"]
                assert status["stableRevision"] == stable and status["currentRevision"] == stable
                assert {p["metadata"]["uid"] for p in pods(cluster, ns)} == stable_pods, "a new rollout of stable"
                time.sleep(1)
            assert condition(md_of(cluster, ns), "Available")["status"] == "True"
            assert len(writes.since(mark)) == 1, "one write: the revert's apply"

            # 5. A new revision aborted by hand while Flux reconciles: it stays out.
            mark = writes.mark()
            third = repo.commit({path: serving(ns, ["--max-num-seqs", "6"])}, "chat: smaller batches")
            wait_applied(cluster.kubectl, ns, third, timeout=60)
            canary = wait_for("the canary", lambda: (lambda s: s.get("revision") if s.get("revision") not in
                              (None, stable) else None)(rollout(cluster, ns)), 60, 0.3)
            aborted = kubectl_moe(cluster, "abort", NAME, "-n", ns)
            assert aborted.returncode == 0, aborted.stderr
            wait_for("the abort", lambda: (rollout(cluster, ns).get("aborted") or {}).get("reason"), 30, 0.3)
            wait_for("the canary's pods to go", lambda: not [p for p in pods(cluster, ns) if
                     p["metadata"]["labels"][names.LABEL_REVISION] == canary], 60, 0.5)
            aborted_at = time.monotonic()
            hold_until = aborted_at + 4 * SYNC_SECONDS
            while time.monotonic() < hold_until:
                assert not [p for p in pods(cluster, ns) if p["metadata"]["labels"][names.LABEL_REVISION] == canary]
                assert md_of(cluster, ns)["status"]["stableRevision"] == stable
                time.sleep(1)
            assert [w for w in writes.since(mark) if w["at"] > aborted_at] == []

            # 6. The fixing commit: rolled out through its steps and promoted.
            fixed = repo.commit({path: serving(ns, ["--max-num-seqs", "4"])}, "chat: the fix")
            wait_applied(cluster.kubectl, ns, fixed, timeout=60)
            try:
                good = wait_for("the fix to be promoted", lambda: (lambda s: s.get("stableRevision") if
                                s.get("stableRevision") not in (stable, canary) and (s.get("rollout") or {}).get(
                                    "completedAt") else None)(md_of(cluster, ns)["status"]), 300, 0.5)
            except AssertionError:
                print(json.dumps(md_of(cluster, ns)["status"], indent=1))
                print(kubectl_moe(cluster, "status", NAME, "-n", ns).stdout)
                raise
            failed, total = load.counts()
        wait_applied(cluster.kubectl, ns, fixed, timeout=30)     # still Ready on the fix, after all of it
        print(f"promoted {good}; {failed} failed requests of {total}")
        print(cluster.kubectl("get", gitrepo.KUSTOMIZATION, "-n", "flux-system", ns).stdout)
        print(kubectl_moe(cluster, "status", NAME, "-n", ns).stdout)
        writes.stop()
    finally:
        cluster.remove_rules(f"gitops-{ns}")
        cluster.set_alert_webhook(None)


def simulated(ns, name, replicas=None, autoscaling=None, node=SIMULATED):
    body = {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": ns},
            "spec": {"model": {"source": "builtin:tiny-mixtral", "dtype": "float32"},
                     "resources": {"gpus": 1}, "scheduling": {"nodeSelector": node}}}
    if replicas is not None:
        body["spec"]["replicas"] = replicas
    if autoscaling is not None:
        body["spec"]["autoscaling"] = autoscaling
    return body


def replicas_owners(body) -> list[str]:
    return sorted(e["manager"] for e in body["metadata"].get("managedFields") or []
                  if "f:replicas" in ((e.get("fieldsV1") or {}).get("f:spec") or {}))


def test_autoscaler_and_git_replicas_left_out_put_back_or_ignored(cluster, ns, operator, repo, tmp_path):
    auto = {"minReplicas": 1, "maxReplicas": 3, "metric": "PromQL", "query": "vector(12)", "target": 4,
            "interval": "1s", "scaleDownStabilization": "300s", "prometheus": {"url": cluster.prometheus_url}}
    ignoring = f"{ns}-ignore"
    url = cluster.devcluster.add_gitops_repository(ignoring, ignore=[
        {"paths": ["/spec/replicas"], "target": {"group": names.GROUP, "kind": names.KIND}}])
    other = Checkout.clone(url, tmp_path / "ignore")
    try:
        sha = repo.commit({f"deploy/{ns}/out.yaml": simulated(ns, "left-out", autoscaling=auto),
                           f"deploy/{ns}/in.yaml": simulated(ns, "in-git", replicas=1, autoscaling=auto)},
                          "autoscaled: spec.replicas left out, and in Git")
        ignored_sha = other.commit({f"deploy/{ns}/ignored.yaml": simulated(ns, "ignored", replicas=1,
                                                                          autoscaling=auto)},
                                   "autoscaled: spec.replicas in Git, ignored by the Kustomization")
        wait_applied(cluster.kubectl, ns, sha, timeout=60)
        wait_applied(cluster.kubectl, ignoring, ignored_sha, timeout=60)
        for name in ("left-out", "ignored", "in-git"):
            wait_for(f"{name} scaled to 3", lambda n=name: md_of(cluster, ns, n)["spec"]["replicas"] == 3, 60, 0.5)
        watches = {name: FluxWrites(cluster, ns, name) for name in ("left-out", "ignored", "in-git")}
        marks = {name: w.mark() for name, w in watches.items()}
        deadline = time.monotonic() + 6 * SYNC_SECONDS
        while time.monotonic() < deadline:      # several Flux syncs
            for name in ("left-out", "ignored"):
                assert md_of(cluster, ns, name)["spec"]["replicas"] == 3, f"{name}: the autoscaler's scale reverted"
            time.sleep(0.5)
        for name in ("left-out", "ignored"):
            assert watches[name].since(marks[name]) == [], f"{name}: Flux wrote to it"
            assert {e["replicas"] for e in watches[name].events[marks[name]:]} <= {3}
        # spec.replicas in Git without the ignore rule: Flux puts 1 back at its syncs, the autoscaler 3 again.
        fights = watches["in-git"].since(marks["in-git"])
        seen = [e["replicas"] for e in watches["in-git"].events[marks["in-git"]:]]
        assert len(fights) >= 2 and {w["replicas"] for w in fights} == {1}, (fights, seen)
        assert seen.count(3) >= len(fights), seen
        print(f"in-git over {6 * SYNC_SECONDS}s: {len(fights)} Flux writes setting 1 back, spec.replicas went {seen}")
        for w in watches.values():
            w.stop()
        # Who owns spec.replicas as the API server records it (docs/gitops.md states this).
        left_out, in_git = md_of(cluster, ns, "left-out"), md_of(cluster, ns, "in-git")
        # Only defaulted, never applied: the /scale writes leave spec.replicas without any owner.
        assert replicas_owners(left_out) == [], replicas_owners(left_out)
        print(f"spec.replicas owners: left out of Git {replicas_owners(left_out)}, in Git {replicas_owners(in_git)}")
    finally:
        cluster.devcluster.remove_gitops_repository(ignoring)
        repo.commit({f"deploy/{ns}/out.yaml": None, f"deploy/{ns}/in.yaml": None}, "autoscaled: removed")


HEALTH_EXPRS = next(d for d in yaml.safe_load_all((ROOT / "examples" / "gitops" / "flux.yaml").read_text())
                    if d["kind"] == "Kustomization")["spec"]["healthCheckExprs"]


def test_flux_health_checks_wait_for_available_only_with_the_cel_expressions(cluster, ns, operator, tmp_path):
    """kstatus alone (wait: true) calls a ModelDeployment healthy once its generation is observed; the
    examples' healthCheckExprs hold the Kustomization until Available."""
    unschedulable = {"devcluster.serving.moe.dev/no-such-node": "true"}
    results = {}
    for kind, options in (("kstatus", {}), ("cel", {"health_check_exprs": HEALTH_EXPRS})):
        name = f"{ns}-{kind}"
        url = cluster.devcluster.add_gitops_repository(name, wait=True, timeout="20s", **options)
        checkout = Checkout.clone(url, tmp_path / kind)
        results[kind] = (name, checkout, checkout.commit(
            {f"deploy/{ns}/{kind}.yaml": simulated(ns, f"health-{kind}", replicas=1, node=unschedulable)},
            "a ModelDeployment that cannot be scheduled"))
    try:
        name, _, sha = results["kstatus"]
        wait_applied(cluster.kubectl, name, sha, timeout=90)        # Ready=True although not Available
        body = md_of(cluster, ns, "health-kstatus")
        assert condition(body, "Available").get("status") != "True"
        assert body["status"]["observedGeneration"] == body["metadata"]["generation"]

        name, checkout, sha = results["cel"]

        def failed():
            k = gitrepo.kustomization(cluster.kubectl, name)
            c = gitrepo.ready(k) or {}
            return c if c.get("status") == "False" and c.get("reason") == "HealthCheckFailed" else None

        c = wait_for("the CEL health check to fail the Kustomization", failed, 90, 1)
        assert f"ModelDeployment/{ns}/health-cel" in c["message"], c
        fixed = checkout.commit({f"deploy/{ns}/cel.yaml": simulated(ns, "health-cel", replicas=1)},
                                "schedulable on the simulated GPU nodes")
        wait_applied(cluster.kubectl, name, fixed, timeout=90)
        assert condition(md_of(cluster, ns, "health-cel"), "Available")["status"] == "True"
    finally:
        for name, _, _ in results.values():
            cluster.devcluster.remove_gitops_repository(name)


def test_the_repository_url_is_in_env_and_deploy_is_what_flux_applies(cluster, tmp_path):
    """The devcluster's own repository (GITOPS_REPO_URL): a ConfigMap pushed to deploy/ appears,
    and is pruned when deleted from Git."""
    env = subprocess.run([sys.executable, "-m", "devcluster", "env"], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "DEVCLUSTER_STATE_DIR": str(cluster.state_dir)}).stdout
    assert f"export GITOPS_REPO_URL={cluster.gitops_repo_url}" in env
    checkout = Checkout.clone(cluster.gitops_repo_url, tmp_path / "devcluster")
    name = f"gitops-e2e-{uuid.uuid4().hex[:6]}"
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"},
          "data": {"from": "git"}}
    pushed = time.monotonic()
    sha = checkout.commit({f"deploy/{name}.yaml": cm}, "a ConfigMap")
    applied = wait_applied(cluster.kubectl, "devcluster", sha, timeout=60)
    assert get(cluster, "configmap", name, "-n", "default")["data"] == {"from": "git"}
    sha = checkout.commit({f"deploy/{name}.yaml": None}, "ConfigMap removed")
    wait_applied(cluster.kubectl, "devcluster", sha, timeout=60)
    wait_for("the ConfigMap to be pruned", lambda: cluster.kubectl(
        "get", "configmap", name, "-n", "default", check=False).returncode != 0, 30, 0.5)
    print(f"pushed -> applied by Flux in {applied - pushed:.1f}s")
