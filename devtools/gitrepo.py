"""A working copy of a devcluster GitOps repository, for the demo and the e2e tests: write a manifest,
commit, push, revert, as a person would with git, and wait for Flux to have applied a commit.

    checkout = Checkout.clone(cluster.gitops_repo_url, tmp_path / "repo")
    sha = checkout.commit({"deploy/team/chat.yaml": manifest}, "chat-moe: 2 replicas")
    applied_at = wait_applied(cluster.kubectl, "devcluster", sha, timeout=60)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

AUTHOR = {"GIT_AUTHOR_NAME": "moe-demo", "GIT_AUTHOR_EMAIL": "moe-demo@localhost",
          "GIT_COMMITTER_NAME": "moe-demo", "GIT_COMMITTER_EMAIL": "moe-demo@localhost"}
FLUX_NAMESPACE = "flux-system"
KUSTOMIZATION = "kustomizations.kustomize.toolkit.fluxcd.io"


@dataclass
class Checkout:
    path: Path

    @classmethod
    def clone(cls, url: str, path: Path) -> Checkout:
        subprocess.run(["git", "clone", "-q", "--branch", "main", url, str(path)], check=True,
                       capture_output=True, text=True, env=_env())
        return cls(path)

    def git(self, *args: str) -> str:
        result = subprocess.run(["git", *args], cwd=self.path, capture_output=True, text=True, env=_env())
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed in {self.path}: {result.stderr.strip()}")
        return result.stdout.strip()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def write(self, relative: str, obj: dict | None) -> None:
        """Write obj as YAML at relative (None: delete the file)."""
        target = self.path / relative
        if obj is None:
            target.unlink(missing_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(obj, sort_keys=False))

    def commit(self, files: dict[str, dict | None], message: str) -> str:
        """Write the files, commit and push to main (rebasing onto what others pushed); the new HEAD
        (HEAD as it was when the files already held this)."""
        self.git("pull", "-q", "--rebase", "origin", "main")
        for relative, obj in files.items():
            self.write(relative, obj)
        self.git("add", "-A")
        if not self.git("status", "--porcelain"):
            return self.head()
        self.git("commit", "-q", "-m", message)
        return self.push()

    def revert(self, sha: str) -> str:
        """`git revert` one commit and push: the commit that puts the previous content back."""
        self.git("revert", "--no-edit", sha)
        return self.push()

    def push(self) -> str:
        for _ in range(5):
            try:
                self.git("push", "-q", "origin", "main")
                return self.head()
            except RuntimeError:
                self.git("pull", "-q", "--rebase", "origin", "main")
        raise RuntimeError(f"could not push {self.path} to main after 5 tries")


def _env() -> dict[str, str]:
    return {**os.environ, **AUTHOR, "GIT_TERMINAL_PROMPT": "0"}


def kustomization(kubectl: Callable[..., subprocess.CompletedProcess], name: str) -> dict:
    return json.loads(kubectl("get", KUSTOMIZATION, name, "-n", FLUX_NAMESPACE, "-o", "json").stdout)


def ready(obj: dict) -> dict | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None)


def applied_revision(obj: dict) -> str:
    """`main@sha1:<sha>` as the Kustomization reports its last applied commit."""
    return (obj.get("status") or {}).get("lastAppliedRevision") or ""


def wait_applied(kubectl: Callable[..., subprocess.CompletedProcess], name: str, sha: str,
                 timeout: float = 120.0, interval: float = 0.2) -> float:
    """Wait until Kustomization flux-system/<name> reports commit sha applied and Ready; returns the
    monotonic time it was first seen so."""
    deadline = time.monotonic() + timeout
    while True:
        obj = kustomization(kubectl, name)
        condition = ready(obj) or {}
        if applied_revision(obj).endswith(sha) and condition.get("status") == "True":
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"Flux did not apply commit {sha[:10]} within {timeout:.0f}s "
                               f"(Kustomization {name}: lastAppliedRevision {applied_revision(obj) or '-'}, "
                               f"Ready {condition.get('status')}: {condition.get('message')})")
        time.sleep(interval)


def flux_writes(md: dict, manager: str = "kustomize-controller") -> str | None:
    """The time of the managedFields entry of Flux's field manager on an object (None: Flux never
    wrote it). A write by Flux that changes anything moves it; a no-op apply leaves the object as is."""
    entries = [e for e in (md.get("metadata") or {}).get("managedFields") or [] if e.get("manager") == manager]
    return max((e.get("time") or "" for e in entries), default=None)
