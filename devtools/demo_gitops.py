"""`make demo-gitops` (`python -m devtools.demo --gitops`): the demo's story driven from Git, not
from kubectl. The devcluster runs Flux (`up --gitops`); every change to the ModelDeployment is a
commit pushed to the devcluster's repository (GITOPS_REPO_URL), which Flux applies:

commit examples/rollout-canary.yaml -> Flux applies it -> Available -> commit a bad revision
(injected latency) -> canary -> the latency alert -> rollback; Flux keeps reconciling every 5 s and
reports its Kustomization Ready, and writes nothing to the ModelDeployment (no drift fight: the
operator writes only status and its annotations; `kubectl moe undo` refuses and says to revert the
commit) -> commit the fix -> rolled out and promoted -> Flux's view beside `kubectl moe status`.

The namespace is `moe-gitops-demo` (not `make demo`'s `moe-demo`: what Git holds there Flux would
put back under that demo's kubectl patches). The manifest stays in Git afterwards:
`git clone $GITOPS_REPO_URL`, edit deploy/moe-gitops-demo/chat-moe.yaml, push.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from devtools import gitrepo
from devtools.demo import Demo
from devtools.gitrepo import Checkout, flux_writes, wait_applied
from devtools.harness import ROOT
from devtools.loadgen import Load

KUSTOMIZATION = "devcluster"        # devcluster.cluster.gitops.DEFAULT_REPOSITORY
SYNC_SECONDS = 5                    # devcluster.cluster.gitops.SYNC_INTERVAL
HOLD_SYNCS = 3


class GitOpsDemo(Demo):
    namespace = "moe-gitops-demo"

    def __init__(self, out=sys.stdout):
        super().__init__(out)
        self.checkout: Checkout | None = None
        self.path = f"deploy/{self.namespace}/{self.name}.yaml"

    def cluster_up(self, gitops: bool = True) -> None:
        if not (self.cluster.read_state() and self.cluster.read_state().gitops):
            self.say("Flux is built the first time (`python -m devcluster build flux`: about 13 minutes on 2 cores)")
        super().cluster_up(gitops=True)
        url = self.cluster.gitops_repo_url
        work = self.cluster.state_dir / "gitops" / "demo-checkout"
        shutil.rmtree(work, ignore_errors=True)
        self.checkout = Checkout.clone(url, work)
        self.say(f"Git: {url} (Flux applies its deploy/ folder every {SYNC_SECONDS}s); checkout in {work}")

    def push(self, args: list[str], message: str) -> str:
        """Commit the manifest with these args, push, and wait for Flux to apply the commit."""
        pushed = time.monotonic()
        sha = self.checkout.commit({self.path: self.manifest_with(args)}, message)
        applied = wait_applied(lambda *a: self.cluster.kubectl(*a), KUSTOMIZATION, sha, timeout=120)
        self.say(f"git push {sha[:8]} \"{message}\" -> Flux applied it {applied - pushed:.1f}s later")
        return sha

    def md_fields(self) -> dict[str, Any]:
        """The ModelDeployment with its managedFields (kubectl leaves them out unless asked)."""
        return json.loads(self.kubectl("get", "md", self.name, "-n", self.namespace, "-o", "json",
                                       "--show-managed-fields"))

    def deploy(self) -> None:
        self.push(self.base_args, f"{self.name}: {self.manifest['spec']['replicas']} replica groups")
        self.wait_available()

    def set_args(self, args: list[str]) -> None:
        self.push(args, f"{self.name}: runtime args {' '.join(args)}")

    def bad_revision(self, load: Load) -> tuple[float, str]:
        result = super().bad_revision(load)
        self.hold_without_drift()
        undo = subprocess.run([sys.executable, "-m", "moe_operator.app.kubectl_plugin", "undo", self.name, "-n",
                               self.namespace], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, **self.cluster.env()})
        self.say(f"$ kubectl moe undo {self.name}  (exit {undo.returncode})\n          {undo.stderr.strip()}")
        return result

    def hold_without_drift(self) -> None:
        """Watch Flux reconcile a few times after the rollback: Ready, and not one write to the object
        (the time of its field manager's managedFields entry, which any write of Flux moves)."""
        start = time.monotonic()
        writes, last = 0, flux_writes(self.md_fields())
        while time.monotonic() - start < HOLD_SYNCS * SYNC_SECONDS:
            k = gitrepo.kustomization(lambda *a: self.cluster.kubectl(*a), KUSTOMIZATION)
            ready = gitrepo.ready(k) or {}
            if ready.get("status") == "False":      # Unknown while a reconcile runs
                raise SystemExit(f"demo: Flux's Kustomization is not Ready: {ready.get('message')}")
            entry = flux_writes(self.md_fields())
            if entry != last:
                writes += 1
            last = entry
            time.sleep(1)
        self.say(f"Flux over {HOLD_SYNCS * SYNC_SECONDS}s of reconciles (every {SYNC_SECONDS}s): Kustomization Ready, "
                 f"{writes} writes to the ModelDeployment (no drift fight: the operator wrote only status "
                 "and annotations)")
        if writes:
            raise SystemExit(f"demo: Flux wrote to the ModelDeployment {writes} times after the rollback")

    def good_revision(self, load: Load) -> str:
        good = super().good_revision(load)
        flux = self.kubectl("get", gitrepo.KUSTOMIZATION, "-n", gitrepo.FLUX_NAMESPACE, KUSTOMIZATION)
        moe = subprocess.run([sys.executable, "-m", "moe_operator.app.kubectl_plugin", "status", self.name, "-n",
                              self.namespace], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, **self.cluster.env()}).stdout
        self.say("Flux's view (kubectl get kustomization -n flux-system):\n" + _indent(flux)
                 + f"\n          kubectl moe status {self.name} -n {self.namespace}:\n" + _indent(moe))
        return good

    def run(self) -> int:
        code = super().run()
        print(f"GitOps: git clone {self.cluster.gitops_repo_url}; edit {self.path}; git push "
              "(Flux applies it within seconds; revert a commit to go back)", flush=True)
        return code


def _indent(text: str) -> str:
    return "\n".join("          " + line for line in text.rstrip().splitlines())


def main() -> int:
    return GitOpsDemo().run()


if __name__ == "__main__":
    sys.exit(main())

