"""`kubectl moe`: look at and steer rollouts of ModelDeployments (installed as `kubectl-moe`).

    kubectl moe status NAME [-n NS] [--watch]   step, weights, analysis figures, pods per track
    kubectl moe promote NAME [--full]           skip the current step (--full: every remaining one)
    kubectl moe abort NAME                      stop the rollout: the new revision leaves rotation
    kubectl moe retry NAME                      roll an aborted revision out again
    kubectl moe history NAME                    every kept revision: number, hash, when, change, result
    kubectl moe undo NAME [--to-revision N]     back to the stable revision (or the one before it), or to N
    kubectl moe pause NAME / resume NAME        hold / continue the steps (analysis keeps running)

One-off actions are annotations with a unique value (the operator acts once per value and keeps what
it handled in status, so a repeat or a restart never acts twice, and no client clock is compared with
the operator's); an abort names the revision it stops. `undo` edits the spec from the revision's
recorded template (its ControllerRevision). GitOps users express lasting intent in Git instead: see
docs/rollouts.md; `undo` refuses an object that Flux or Argo CD manages (they would put the spec back
at their next sync) and says to revert the commit, unless given --force.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..api import names
from ..api.reasons import ABORT_USER
from ..api.spec import ModelDeployment, SpecError
from ..api.timestamps import epoch, iso
from ..rollout.requests import (
    ANNOTATION_ABORT,
    ANNOTATION_PAUSED,
    ANNOTATION_PROMOTE,
    ANNOTATION_PROMOTE_FULL,
    ANNOTATION_RESUME,
    ANNOTATION_RETRY,
    AbortRequest,
)
from ..world import revisions

# --- pure: what to write -------------------------------------------------------------------------

def annotation_patch(action: str, body: Mapping[str, Any], now: float, full: bool = False) -> dict[str, Any]:
    """The merge patch of metadata.annotations for a one-off action. Values are unique (the client's
    time plus a random suffix): the operator compares them only for equality with what it handled."""
    stamp = f"{iso(now)}/{uuid.uuid4().hex[:8]}"
    if action == "promote":
        return {ANNOTATION_PROMOTE_FULL if full else ANNOTATION_PROMOTE: stamp}
    if action == "retry":
        return {ANNOTATION_RETRY: stamp}
    if action == "pause":
        return {ANNOTATION_PAUSED: "true"}
    if action == "resume":
        return {ANNOTATION_PAUSED: None, ANNOTATION_RESUME: stamp}
    if action == "abort":
        status = body.get("status") or {}
        revision = (status.get("rollout") or {}).get("revision") or status.get("currentRevision")
        if not revision:
            raise SystemExit("nothing to abort: the ModelDeployment has no revision in its status yet")
        return {ANNOTATION_ABORT: AbortRequest(revision, ABORT_USER, "aborted with kubectl moe abort", now,
                                               "user").to_json()}
    raise ValueError(action)


def _records(items: Sequence[Mapping[str, Any]]) -> list[revisions.Recorded]:
    recs = [r for r in (revisions.recorded_from(b) for b in items) if r is not None]
    return sorted(recs, key=lambda r: r.number)


def undo_patch(body: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
               to_revision: int | None = None) -> dict[str, Any]:
    """The spec patch that goes back, as `kubectl rollout undo` does: to revision number
    `to_revision`, else to the stable revision while a rollout runs, else to the newest revision
    before the current one. The template comes from the revision's ControllerRevision."""
    status = body.get("status") or {}
    stable, current = status.get("stableRevision"), status.get("currentRevision")
    recs = _records(records)
    if to_revision is not None:
        target = next((r for r in recs if r.number == to_revision), None)
        if target is None:
            kept = ", ".join(str(r.number) for r in recs) or "none"
            raise SystemExit(f"revision {to_revision} is not kept (kept: {kept}); see kubectl moe history")
    elif current and stable and current != stable:
        target = next((r for r in recs if r.revision == stable), None)
    else:
        earlier = [r for r in recs if r.revision != current]
        target = earlier[-1] if earlier else None
    if target is None:
        raise SystemExit("nothing to undo: no earlier revision is kept")
    if target.revision == current:
        raise SystemExit(f"revision {target.number} ({target.revision}) is already the current one")
    # Fields the old template did not set are removed (null in a merge patch).
    return {"spec": {k: target.template.get(k) for k in revisions.TEMPLATE_FIELDS}}


# Marks a GitOps engine leaves on what it applies: Flux's kustomize-controller and helm-controller
# label each object with their object's name and namespace; Argo CD tracks by annotation (its default
# since 3.0) or by its instance label; either applies server-side under its own field manager.
FLUX_LABELS = (("kustomize.toolkit.fluxcd.io/name", "kustomize.toolkit.fluxcd.io/namespace", "Kustomization"),
               ("helm.toolkit.fluxcd.io/name", "helm.toolkit.fluxcd.io/namespace", "HelmRelease"))
ARGOCD_TRACKING_ANNOTATION = "argocd.argoproj.io/tracking-id"
GITOPS_MANAGERS = {"kustomize-controller": "Flux", "helm-controller": "Flux",
                   "argocd-controller": "Argo CD", "argocd-application-controller": "Argo CD"}


def gitops_manager(body: Mapping[str, Any]) -> str | None:
    """Who keeps this object's spec as Git says: "Flux Kustomization flux-system/apps",
    "Argo CD Application team-a:chat-moe", or None when no GitOps engine's mark is on it."""
    meta = body.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    for name_label, ns_label, kind in FLUX_LABELS:
        if labels.get(name_label):
            return f"Flux {kind} {labels.get(ns_label, '?')}/{labels[name_label]}"
    tracking = annotations.get(ARGOCD_TRACKING_ANNOTATION)
    if tracking:
        return f"Argo CD Application {tracking.split(':', 1)[0]}"
    for entry in meta.get("managedFields") or ():
        engine = GITOPS_MANAGERS.get(entry.get("manager", ""))
        if engine and "f:spec" in (entry.get("fieldsV1") or {}):
            return f"{engine} (field manager {entry['manager']})"
    return None


def undo_gitops_hint(manager: str) -> str:
    return (f"this ModelDeployment is managed by {manager}: an undo here would be set back to what Git "
            "says at its next sync. Revert the commit in Git instead (`git revert <commit> && git push`); "
            "the operator rolls the reverted spec out (a revision it still runs as stable is taken back "
            "at once, with no new rollout). --force writes the spec anyway (say, with the sync suspended).")


def render_history(body: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """`kubectl moe history`: one line per kept revision, oldest first."""
    status = body.get("status") or {}
    rows = [("REVISION", "HASH", "CREATED", "RESULT", "CHANGE")]
    for r in _records(records):
        result = r.result
        text = result.get("result", "")
        if result.get("reason"):
            text += f" ({result['reason']}" + (f": {result['message']}" if result.get("message") else "") + ")"
        marks = [m for m, rev in (("current", status.get("currentRevision")),
                                  ("stable", status.get("stableRevision"))) if rev == r.revision]
        if marks:
            text = f"{text} [{', '.join(marks)}]".strip()
        change = r.annotations.get(revisions.ANNOTATION_CHANGE_CAUSE) or r.annotations.get(revisions.ANNOTATION_CHANGE, "")
        rows.append((str(r.number), r.revision, r.created, text or "-", change))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
                     for row in rows)


# --- pure: what to show --------------------------------------------------------------------------

def _age(ts: str | None, now: float) -> str:
    if not ts:
        return ""
    t = epoch(ts)
    if t is None:
        return ts
    s = max(0, int(now - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _steps_text(body: Mapping[str, Any], index: int | None) -> str:
    """The current step, read with the operator's own parser (one reading of the spec)."""
    try:
        steps = ModelDeployment.from_body(body).rollout.steps
    except SpecError as error:
        return f"(spec not readable: {error})"
    if index is None:
        return ""
    if index >= len(steps):
        return f"{len(steps)}/{len(steps)} (promoting)"
    return f"{index + 1}/{len(steps)} {steps[index].describe()}"


def _figures(figures: Mapping[str, Any]) -> str:
    parts = []
    if "p99LatencyMs" in figures:
        parts.append(f"p99 {figures['p99LatencyMs']:.0f}ms")
    if "ttftP99Ms" in figures:
        parts.append(f"ttft p99 {figures['ttftP99Ms']:.0f}ms")
    if "errorRate" in figures:
        parts.append(f"errors {100 * figures['errorRate']:.1f}%")
    if "samples" in figures:
        parts.append(f"{figures['samples']:g} requests")
    if "ratioToStable" in figures:
        parts.append(f"{figures['ratioToStable']:.2f}x stable")
    return ", ".join(parts)


def render_status(body: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], now: float) -> str:
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    state = status.get("rollout") or {}
    strategy = (spec.get("rollout") or {}).get("strategy", "Canary")
    lines = [f"{meta.get('namespace')}/{meta.get('name')}   {strategy}   {status.get('phase', 'Unknown')}"
             f"   {status.get('readyReplicas', 0)}/{spec.get('replicas', 1)} groups ready"]
    current, stable = status.get("currentRevision"), status.get("stableRevision")
    lines.append(f"  revision    {current or '-'}" + (f"   (stable {stable})" if stable and stable != current else
                                                      "   (stable)"))
    if state.get("revision") == current and current != stable:
        if strategy == "Canary":
            lines.append(f"  step        {_steps_text(body, state.get('stepIndex'))}   weight "
                         f"{state.get('weight', 0)}% (achieved {status.get('canaryWeight', 0)}%)")
        else:
            phase = "promoting (scaling to full size)" if state.get("promoting") else "preview"
            lines.append(f"  blue-green  {phase}, preview ready {_age(state.get('previewReadyAt'), now)} ago"
                         if state.get("previewReadyAt") else f"  blue-green  {phase}, preview loading")
        lines.append(f"  started     {_age(state.get('startedAt'), now)} ago")
    analysis = state.get("analysis") or {}
    if analysis.get("measurements"):
        last = analysis["measurements"][-1]
        lines.append(f"  analysis    {last['result']} ({analysis.get('provider')}): {_figures(last.get('figures') or {})}"
                     f"   [{analysis.get('failures', 0)} failed / {analysis.get('inconclusive', 0)} inconclusive]")
        if last.get("message") and last["result"] != "pass":
            lines.append(f"              {last['message']}")
    if state.get("aborted"):
        a = state["aborted"]
        lines.append(f"  ABORTED     {a.get('reason')}: {a.get('message', '')} ({a.get('source')}, "
                     f"{_age(a.get('at'), now)} ago); kubectl moe retry {meta.get('name')} to try again")
    if state.get("paused"):
        p = state["paused"]
        lines.append(f"  PAUSED      {p.get('reason')}: {p.get('message', '')}")
    elif ((meta.get("annotations") or {}).get(ANNOTATION_PAUSED) or "").lower() == "true":
        lines.append(f"  PAUSED      by hand (kubectl moe resume {meta.get('name')})")
    if state.get("completedAt") and current == stable:
        lines.append(f"  promoted    {_age(state['completedAt'], now)} ago")
    auto = status.get("autoscaling") or {}
    if spec.get("autoscaling") and auto:
        bounds = spec["autoscaling"]
        lines.append(f"  autoscaling {auto.get('metric')} {auto.get('currentValue', '-')} (target {auto.get('target')}), "
                     f"wants {auto.get('desiredReplicas')} in [{bounds.get('minReplicas', 1)}, "
                     f"{bounds.get('maxReplicas')}]: {auto.get('reason')}")
        last = auto.get("lastDecision")
        if last:
            lines.append(f"              last scaled {last.get('from')} -> {last.get('to')} {_age(last.get('at'), now)} "
                         f"ago ({last.get('reason')})")
    conds = " ".join(f"{c['type']}={c['status']}({c.get('reason', '')})" for c in status.get("conditions") or [])
    if conds:
        lines.append(f"  conditions  {conds}")
    if status.get("message"):
        lines.append(f"  message     {status['message']}")
    lines.append("")
    rows = [("TRACK", "REVISION", "GROUP", "RANK", "POD", "READY", "IN-ROTATION", "AGE")]
    def key(p):
        labels = p["metadata"].get("labels") or {}
        return (labels.get(names.LABEL_TRACK, ""), labels.get(names.LABEL_REVISION, ""),
                int(labels.get(names.LABEL_REPLICA, 0) or 0), int(labels.get(names.LABEL_RANK, 0) or 0))
    for p in sorted(pods, key=key):
        labels = p["metadata"].get("labels") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (p.get("status") or {}).get("conditions") or [])
        state_text = "Terminating" if p["metadata"].get("deletionTimestamp") else ("yes" if ready else "no")
        rows.append((labels.get(names.LABEL_TRACK, ""), labels.get(names.LABEL_REVISION, ""),
                     labels.get(names.LABEL_REPLICA, ""), labels.get(names.LABEL_RANK, ""), p["metadata"]["name"],
                     state_text, labels.get(names.LABEL_IN_ROTATION, ""),
                     _age(p["metadata"].get("creationTimestamp"), now)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


# --- I/O -----------------------------------------------------------------------------------------

class Cluster:
    def __init__(self, kubeconfig: str | None, context: str | None):
        # Deferred on purpose: the kubernetes client takes about a second to import, and `kubectl moe
        # --help`, a usage error or the pure parts (tested without a cluster) do not need it.
        from kubernetes import client, config
        from kubernetes.dynamic import DynamicClient
        api = config.new_client_from_config(config_file=kubeconfig, context=context)
        self.dyn = DynamicClient(api)
        self.md = self.dyn.resources.get(api_version=names.API_VERSION, kind=names.KIND)
        self.core = client.CoreV1Api(api)
        try:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            self.default_namespace = (active.get("context") or {}).get("namespace") or "default"
        except Exception:
            self.default_namespace = "default"

    def get(self, ns: str, name: str) -> dict[str, Any]:
        from kubernetes.dynamic.exceptions import NotFoundError  # deferred with the client (above)
        try:
            return self.dyn.get(self.md, name=name, namespace=ns).to_dict()
        except NotFoundError:
            raise SystemExit(f"modeldeployment {ns}/{name} not found") from None

    def patch(self, ns: str, name: str, body: dict[str, Any]) -> None:
        self.dyn.patch(self.md, name=name, namespace=ns, body=body, content_type="application/merge-patch+json")

    def records(self, ns: str, name: str) -> list[dict[str, Any]]:
        resource = self.dyn.resources.get(api_version=revisions.API_VERSION, kind=revisions.KIND)
        selector = names.selector_string(names.owned_selector(name))
        return self.dyn.get(resource, namespace=ns, label_selector=selector).to_dict().get("items") or []

    def pods(self, ns: str, name: str) -> list[dict[str, Any]]:
        selector = names.selector_string(names.owned_selector(name))
        items = self.core.list_namespaced_pod(ns, label_selector=selector).items
        return [self.core.api_client.sanitize_for_serialization(p) for p in items]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl moe", description="Rollouts of ModelDeployments.")
    p.add_argument("--kubeconfig")
    p.add_argument("--context")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd, text in (("status", "show the rollout"), ("promote", "skip the current step"),
                      ("abort", "abort the rollout"), ("retry", "retry an aborted revision"),
                      ("history", "list the kept revisions"),
                      ("undo", "go back to the stable (or previous) revision, or to --to-revision N"),
                      ("pause", "hold the steps"), ("resume", "continue the steps")):
        s = sub.add_parser(cmd, help=text)
        s.add_argument("name")
        s.add_argument("-n", "--namespace")
        if cmd == "status":
            s.add_argument("-w", "--watch", action="store_true", help="refresh until interrupted")
            s.add_argument("--interval", type=float, default=1.0)
            s.add_argument("--timeout", type=float, default=0, help="stop watching after this many seconds")
        if cmd == "promote":
            s.add_argument("--full", action="store_true", help="skip every remaining step")
        if cmd == "undo":
            s.add_argument("--to-revision", type=int, help="the revision number (kubectl moe history)")
            s.add_argument("--force", action="store_true",
                           help="write the spec even when Flux or Argo CD manages the object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cluster = Cluster(args.kubeconfig, args.context)
    ns = args.namespace or cluster.default_namespace
    if args.command == "status":
        deadline = time.monotonic() + args.timeout if args.timeout else None
        while True:
            text = render_status(cluster.get(ns, args.name), cluster.pods(ns, args.name), time.time())
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")
                sys.stdout.flush()
            else:
                print(text)
                return 0
            if deadline and time.monotonic() > deadline:
                return 0
            try:
                time.sleep(args.interval)    # a display refresh, not a wait for a condition
            except KeyboardInterrupt:
                return 0
    body = cluster.get(ns, args.name)
    if args.command == "history":
        print(render_history(body, cluster.records(ns, args.name)))
        return 0
    if args.command == "undo":
        patch = undo_patch(body, cluster.records(ns, args.name), args.to_revision)
        manager = gitops_manager(body)
        if manager and not args.force:
            print(f"kubectl moe undo: {undo_gitops_hint(manager)}", file=sys.stderr)
            return 1
        if manager:
            print(f"kubectl moe undo: warning: {manager} manages this object; unless its sync is suspended, "
                  "it will set the spec back: revert the commit in Git for a lasting undo", file=sys.stderr)
        cluster.patch(ns, args.name, patch)
        print(f"modeldeployment {ns}/{args.name}: spec set back"
              + (f" to revision {args.to_revision}" if args.to_revision is not None else ""))
        return 0
    patch = annotation_patch(args.command, body, time.time(), full=getattr(args, "full", False))
    cluster.patch(ns, args.name, {"metadata": {"annotations": patch}})
    print(f"modeldeployment {ns}/{args.name}: {args.command}" + (" --full" if getattr(args, "full", False) else "")
          + (f" ({json.loads(patch[ANNOTATION_ABORT])['revision']})" if args.command == "abort" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
