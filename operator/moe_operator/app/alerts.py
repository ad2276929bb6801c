"""The Alertmanager webhook: `POST /alerts` turns a firing alert that names a ModelDeployment into a
durable abort request of its rollout.

Alertmanager posts (webhook_config, payload version 4) a group of alerts:
`{"version": "4", "status": "firing", "receiver", "groupKey", "groupLabels", "commonLabels",
"commonAnnotations", "externalURL", "truncatedAlerts", "alerts": [{"status": "firing"|"resolved",
"labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}]}`.

- Auth: `Authorization: Bearer <token>`, compared in constant time with the token from a Secret
  (or a file). Missing or wrong: 401. Malformed payload: 400 with a message. Neither has any effect.
  Optionally (NamespaceTokens) a tenant's token: the one in a fixed-name Secret of a namespace
  authorizes alerts naming that namespace only (those naming another are ignored, and say why); a
  post no token authorizes is 401, a malformed one too (nothing is told to a caller without a token).
- Matching: a firing alert whose labels carry `namespace` and `modeldeployment` names that object;
  optional `revision` (must be the revision being rolled out) and `track` (`canary` or `preview`;
  an alert on the `stable` track does not abort a rollout).
- Scope: an alert aborts only when it is about the new revision: its `revision` label is the
  rollout's, or its `track` is canary/preview, or it started (`startsAt`) after the rollout began
  (status.rollout.startedAt, or retriedAt after a retry). An alert that names only the object and
  was already firing before (about the old stable, say) would otherwise abort every new rollout, and
  again after each retry, for as long as it fires. The reply's `ignored` entries say why.
- Effect: the annotation `serving.moe.dev/abort` on the ModelDeployment (JSON: revision, reason,
  message, labels, when the alert arrived). It is durable before the reply: a SIGKILLed operator
  finds it on restart, and Alertmanager retries on 5xx until it is written. Repeats are harmless (an
  annotation already naming that revision is left as it is, so the first arrival time is kept) and a
  resolved alert never resumes anything: only `kubectl moe retry` or a new revision does.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from kubernetes.dynamic.exceptions import NotFoundError

from ..api import names
from ..api.reasons import ABORT_ALERT
from ..api.timestamps import epoch, iso
from ..rollout.requests import ANNOTATION_ABORT, AbortRequest
from ..world.state import RolloutState

log = logging.getLogger("moe_operator.app.alerts")

LABEL_NAMESPACE = "namespace"
LABEL_MODELDEPLOYMENT = "modeldeployment"
LABEL_REVISION = "revision"
LABEL_TRACK = "track"
MAX_ALERTS = 1000
MAX_BODY_BYTES = 1 << 20
MAX_TOKEN_NAMESPACES = 10      # namespaces whose Secret one post without the global token may make us read
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class PayloadError(ValueError):
    """A payload that is not Alertmanager's webhook JSON; the message says what is wrong."""


@dataclass(frozen=True)
class Alert:
    status: str                                  # firing | resolved
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: str = ""
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "alert")

    @property
    def message(self) -> str:
        text = self.annotations.get("summary") or self.annotations.get("description") or ""
        return f"{self.name}: {text}" if text else self.name


@dataclass(frozen=True)
class Target:
    """A firing alert that names a ModelDeployment."""

    namespace: str
    name: str
    revision: str | None
    track: str | None
    alert: Alert


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise PayloadError(f"{where} must be an object of string values")
    return dict(value)


def parse_payload(data: bytes) -> list[Alert]:
    """The alerts of one webhook post; PayloadError when it is not Alertmanager's JSON (version 4)."""
    if len(data) > MAX_BODY_BYTES:
        raise PayloadError(f"payload larger than {MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise PayloadError(f"payload is not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise PayloadError("payload must be a JSON object")
    version = payload.get("version")
    if version is not None and str(version) != "4":
        raise PayloadError(f"unsupported payload version {version!r} (Alertmanager's webhook sends \"4\")")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise PayloadError("payload.alerts must be a list")
    if len(alerts) > MAX_ALERTS:
        raise PayloadError(f"more than {MAX_ALERTS} alerts in one payload")
    out = []
    for i, a in enumerate(alerts):
        where = f"alerts[{i}]"
        if not isinstance(a, dict):
            raise PayloadError(f"{where} must be an object")
        status = a.get("status")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"{where}.status must be \"firing\" or \"resolved\", not {status!r}")
        labels = _str_map(a.get("labels"), f"{where}.labels")
        out.append(Alert(status, labels, _str_map(a.get("annotations"), f"{where}.annotations"),
                         str(a.get("startsAt") or ""), str(a.get("fingerprint") or "")))
    return out


def targets(alerts: Iterable[Alert]) -> list[Target]:
    """Firing alerts that name a ModelDeployment (resolved ones never act)."""
    out = []
    for a in alerts:
        ns, name = a.labels.get(LABEL_NAMESPACE), a.labels.get(LABEL_MODELDEPLOYMENT)
        if a.status == "firing" and ns and name:
            out.append(Target(ns, name, a.labels.get(LABEL_REVISION) or None, a.labels.get(LABEL_TRACK) or None, a))
    return out


def rollout_revision(body: Mapping[str, Any], now: float) -> str | None:
    """The revision an abort would stop: the one being rolled out, or one just promoted whose
    predecessor is still warm (then an abort switches back at once). None when nothing runs."""
    status = body.get("status") or {}
    state = RolloutState.from_json(status.get("rollout"))
    revision = state.revision
    if revision:
        if not state.completed_at:
            return revision
        warm_until = epoch(state.scale_down_at)
        if warm_until and now < warm_until and state.previous_revision:
            return revision
    current = status.get("currentRevision")
    if current and status.get("stableRevision") and current != status["stableRevision"]:
        return current
    return None


def abort_request(target: Target, body: Mapping[str, Any], now: float) -> tuple[AbortRequest | None, str]:
    """Pure: the abort annotation to write for this alert on this object, or None and why not."""
    spec = body.get("spec") or {}
    alerts_cfg = ((spec.get("rollout") or {}).get("analysis") or {}).get("alerts") or {}
    if alerts_cfg.get("enabled") is False:
        return None, "alerts are disabled in spec.rollout.analysis.alerts"
    revision = rollout_revision(body, now)
    if revision is None:
        return None, "no rollout is running"
    if target.revision and target.revision != revision:
        return None, f"the alert names revision {target.revision}, the rollout is of {revision}"
    if target.track == names.TRACK_STABLE:
        return None, "the alert is on the stable track"
    state = RolloutState.from_json((body.get("status") or {}).get("rollout"))
    if state.aborted and state.revision == revision:
        return None, f"revision {revision} is already aborted"
    not_about_it = _not_about(target, revision, state)
    if not_about_it:
        return None, not_about_it
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    existing = AbortRequest.from_json(annotations.get(ANNOTATION_ABORT))
    # An abort the operator has not acted on yet (it marks each one handled, by id: no clocks compared).
    if existing and existing.revision == revision and (state.handled or {}).get("abort") != existing.key:
        return None, f"an abort of revision {revision} is already recorded"
    labels = dict(target.alert.labels)
    return AbortRequest(revision, ABORT_ALERT, target.alert.message, now, "alert", labels), "abort"


def _not_about(target: Target, revision: str, state: RolloutState) -> str | None:
    """Why the alert is not about the rollout of `revision` (None when it is): it names that revision
    or the canary/preview track, or it started after the rollout began (or was retried)."""
    if target.revision == revision or target.track in (names.TRACK_CANARY, names.TRACK_PREVIEW):
        return None
    began = None
    if state.revision == revision:
        times = [t for t in (epoch(state.started_at), epoch(state.retried_at)) if t is not None]
        began = max(times, default=None)
    starts = epoch(target.alert.starts_at)
    if began is not None and starts is not None and starts >= began - 1e-3:
        return None
    names_neither = (f"the alert names neither revision {revision} (label {LABEL_REVISION}) nor the canary or "
                     f"preview track (label {LABEL_TRACK})")
    if began is None:
        return f"{names_neither}, and the rollout of {revision} has not begun yet"
    if starts is None:
        return f"{names_neither}, and it has no startsAt to show that it started after the rollout began at {iso(began)}"
    return (f"{names_neither}, and it started at {iso(starts)}, before the rollout began at {iso(began)}: "
            f"it is about what ran before")


# --- tokens --------------------------------------------------------------------------------------

def bearer_matches(header: str | None, expected: str | None) -> bool:
    """`Authorization: Bearer <token>` against the expected token, in constant time."""
    if not expected or not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), expected.encode())


class TokenSource:
    """The webhook's token: from a file (re-read when it changes) or a Secret key (cached briefly,
    so a rotated Secret takes effect within `ttl` seconds)."""

    def __init__(self, *, file: str | Path | None = None, secret: tuple[str, str, str] | None = None,
                 read_secret: Callable[[str, str], Mapping[str, str]] | None = None, ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.file = Path(file) if file else None
        self.secret = secret             # (namespace, name, key)
        self.read_secret = read_secret   # (namespace, name) -> the Secret's `data` (base64 values)
        self.ttl, self.clock = ttl, clock
        self._cached: tuple[float, str | None] | None = None

    @property
    def configured(self) -> bool:
        return bool(self.file or (self.secret and self.read_secret))

    def current(self) -> str | None:
        if self._cached and self.clock() - self._cached[0] < self.ttl:
            return self._cached[1]
        token = None
        if self.file:
            try:
                token = self.file.read_text().strip() or None
            except OSError as error:
                log.warning("cannot read the alerts token file %s: %s", self.file, error)
        elif self.secret and self.read_secret:
            ns, name, key = self.secret
            try:
                raw = (self.read_secret(ns, name) or {}).get(key)
                token = base64.b64decode(raw).decode().strip() if raw else None
            except Exception as error:   # an unreadable Secret refuses every post (401), never crashes
                log.warning("cannot read the alerts token from Secret %s/%s: %s", ns, name, error)
        self._cached = (self.clock(), token)
        return token


class NamespaceTokens:
    """Tenants' tokens: the Secret `name` (key `key`) in a namespace holds a token that authorizes
    alerts naming that namespace, and no other. Read with `read_secret(namespace, name)` (the Secret's
    `data`, base64 values; the operator needs `get` on Secrets of that one name) and cached per
    namespace for `ttl` seconds, a missing or unreadable Secret too (no token: nothing authorized)."""

    def __init__(self, name: str, key: str, read_secret: Callable[[str, str], Mapping[str, str]],
                 ttl: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.name, self.key, self.read_secret = name, key, read_secret
        self.ttl, self.clock = ttl, clock
        self._cache: dict[str, tuple[float, str | None]] = {}

    def token(self, namespace: str) -> str | None:
        cached = self._cache.get(namespace)
        if cached and self.clock() - cached[0] < self.ttl:
            return cached[1]
        token = None
        try:
            raw = (self.read_secret(namespace, self.name) or {}).get(self.key)
            if raw:
                token = base64.b64decode(raw).decode().strip() or None
        except Exception as error:     # 404: the namespace has no token; 403: the Role lacks it
            if getattr(error, "status", None) != 404:
                log.warning("cannot read the alerts token from Secret %s/%s: %s", namespace, self.name,
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[namespace] = (self.clock(), token)
        return token

    def authorized(self, header: str | None, namespaces: Iterable[str]) -> set[str]:
        """The namespaces (of those named, valid names only, at most MAX_TOKEN_NAMESPACES) whose token
        the bearer header carries."""
        if not header or header.partition(" ")[0].lower() != "bearer":
            return set()
        names_ = sorted({ns for ns in namespaces if isinstance(ns, str) and _NAMESPACE.match(ns)})
        return {ns for ns in names_[:MAX_TOKEN_NAMESPACES] if bearer_matches(header, self.token(ns))}


# --- the endpoint --------------------------------------------------------------------------------

class AbortStore:
    """Writes abort requests on ModelDeployments (a merge patch of one annotation)."""

    def __init__(self, dynamic_client):
        self.dyn = dynamic_client
        self._md = dynamic_client.resources.get(api_version=names.API_VERSION, kind=names.KIND)

    def get(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        try:
            return self.dyn.get(self._md, name=name, namespace=namespace).to_dict()
        except NotFoundError:
            return None

    def annotate(self, namespace: str, name: str, value: str) -> Mapping[str, Any]:
        """Write the abort annotation; returns the object as the API server stored it."""
        return self.dyn.patch(self._md, name=name, namespace=namespace,
                              body={"metadata": {"annotations": {ANNOTATION_ABORT: value}}},
                              content_type="application/merge-patch+json").to_dict()


def handle_alerts(alerts: list[Alert], store, now: float,
                  written: list[Mapping[str, Any]] | None = None,
                  namespaces: set[str] | None = None) -> dict[str, list[dict[str, str]]]:
    """Apply the alerts of one post; returns what was aborted and what was ignored (and why).
    The objects as written (with their abort annotation) are appended to `written`. `namespaces`: the
    only namespaces the post's token may act on (None: every one, the global token)."""
    result: dict[str, list[dict[str, str]]] = {"aborted": [], "ignored": []}
    for target in targets(alerts):
        entry = {"namespace": target.namespace, "modeldeployment": target.name, "alertname": target.alert.name}
        if namespaces is not None and target.namespace not in namespaces:
            result["ignored"].append({**entry, "why": f"the bearer token is not namespace {target.namespace}'s"})
            continue
        body = store.get(target.namespace, target.name)
        if body is None:
            result["ignored"].append({**entry, "why": "no such ModelDeployment"})
            continue
        request, why = abort_request(target, body, now)
        if request is None:
            result["ignored"].append({**entry, "why": why})
            continue
        body = store.annotate(target.namespace, target.name, request.to_json())
        if written is not None and body:
            written.append(body)
        result["aborted"].append({**entry, "revision": request.revision})
    return result


def alerts_routes(token: TokenSource, store, *,
                  on_abort: Callable[[Mapping[str, Any], float], None] | None = None,
                  on_result: Callable[[str], None] | None = None,
                  namespace_tokens: NamespaceTokens | None = None,
                  clock: Callable[[], float] = time.time) -> list[web.RouteDef]:
    """`POST /alerts` for the operator's HTTP server. `on_abort(body, received_at)` runs after an
    abort is recorded, with the object as written (the operator reconciles it at once); what it
    returns (or its awaitable gives), a word on how the rollback went, goes into the reply;
    `on_result(result)` counts posts (ok, unauthorized, bad_request, error). With `namespace_tokens`,
    a post without the global token may still act on the namespaces whose own token it carries."""

    def count(result: str) -> None:
        if on_result:
            on_result(result)

    def unauthorized() -> web.Response:
        count("unauthorized")
        return web.json_response({"error": "missing or wrong bearer token"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer realm="moe-operator"'})

    async def post_alerts(request: web.Request) -> web.Response:
        received = clock()
        header = request.headers.get("Authorization")
        scope: set[str] | None = None       # the namespaces a tenant's token authorizes; None: all
        if not bearer_matches(header, token.current()):
            if namespace_tokens is None or header is None:
                return unauthorized()
            try:
                alerts = parse_payload(await request.read())
            except (PayloadError, web.HTTPRequestEntityTooLarge):
                return unauthorized()
            named = {a.labels.get(LABEL_NAMESPACE) for a in alerts} - {None}
            scope = await asyncio.to_thread(namespace_tokens.authorized, header, named)
            if not scope:
                return unauthorized()
        else:
            try:
                alerts = parse_payload(await request.read())
            except PayloadError as error:
                count("bad_request")
                return web.json_response({"error": str(error)}, status=400)
            except web.HTTPRequestEntityTooLarge:
                count("bad_request")
                return web.json_response({"error": "payload too large"}, status=413)
        written: list[Mapping[str, Any]] = []
        try:
            result = await asyncio.to_thread(handle_alerts, alerts, store, received, written, scope)
        except Exception as error:     # Alertmanager retries a 5xx: the abort is not lost
            log.exception("could not record the alerts")
            count("error")
            return web.json_response({"error": f"could not record the abort: {error}"}, status=503)
        count("ok")
        for entry in result["aborted"]:
            log.warning("alert %s aborts %s/%s revision %s", entry["alertname"], entry["namespace"],
                        entry["modeldeployment"], entry["revision"])
        if on_abort:
            for body, entry in zip(written, result["aborted"], strict=False):
                rollback = on_abort(body, received)
                if inspect.isawaitable(rollback):
                    rollback = await rollback
                if rollback:
                    entry["rollback"] = rollback
        return web.json_response(result)

    return [web.post("/alerts", post_alerts)]
