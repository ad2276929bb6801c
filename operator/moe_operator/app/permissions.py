"""What the operator may do, checked at start and every so often; and when it is ready.

`RULES` is the one list of the permissions `moe-operator run` uses (docs/helm.md's RBAC table is
`markdown_table()`, and a unit test keeps the two equal). At start, and again every
`RECHECK_SECONDS` (every `RETRY_SECONDS` while something is missing, so a fixed Role is noticed
without a restart), the operator asks the API server with one SelfSubjectAccessReview per verb,
resource and namespace (every authenticated user may create those, through `system:basic-user`),
logs one line per missing permission and keeps /healthz at 503 with that line.

/healthz is 200 only when kopf has started, every permission is granted, a first LIST of
ModelDeployments, pods and Services in each watched namespace has succeeded (what kopf's watches open
with) and none of kopf's watches has logged a failed attempt within its retry interval: a Ready pod
reconciles.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kubernetes import client

from ..api import names

RECHECK_SECONDS = 300.0     # permissions granted: look again this often (a narrowed Role; writes it forbids fail at once anyway, into status)
RETRY_SECONDS = 5.0         # something missing or failing: look again this soon
KOPF_RETRY_WINDOW = 11.0    # kopf retries a failed request at least every 10 s (handlers.RetryForever)

ALWAYS = "always"
CLUSTER_WIDE = "cluster-wide"          # only with --all-namespaces (kopf watches CRDs)
NAMESPACE_GLOBS = "namespace globs"    # only with --namespace patterns (kopf watches namespaces)
OPTIONAL = "optional"                  # used where granted, never checked: without it a feature is off


@dataclass(frozen=True)
class Rule:
    """One row of the RBAC table: resources of one API group, the verbs the operator uses on them."""
    group: str
    resources: tuple[str, ...]           # plural names, `name/subresource` for a subresource
    verbs: tuple[str, ...]
    why: str
    cluster_scoped: bool = False
    needed: str = ALWAYS                 # ALWAYS, CLUSTER_WIDE, NAMESPACE_GLOBS or OPTIONAL


RULES: tuple[Rule, ...] = (
    Rule(names.GROUP, ("modeldeployments",), ("get", "list", "watch", "patch"),
         "kopf watches them and keeps its bookkeeping in annotations; `/alerts` reads one by name and "
         "writes the abort annotation"),
    Rule(names.GROUP, ("modeldeployments/status",), ("patch",), "the operator's status (merge patch)"),
    Rule(names.GROUP, ("modeldeployments/scale",), ("patch",),
         "the built-in autoscaler sets the replica count (the same door as `kubectl scale`)"),
    Rule(names.GROUP, ("modeldeployments/finalizers",), ("update",),
         "pods, Services, ControllerRevisions and PrometheusRules carry an ownerReference with "
         "`blockOwnerDeletion: true`, which the OwnerReferencesPermissionEnforcement admission plugin "
         "(OpenShift, hardened clusters) allows only to whoever may update the owner's finalizers"),
    Rule("", ("pods", "services"), ("list", "watch", "create", "patch", "delete"),
         "observed by label (watch-fed caches, server-side selector); written by server-side apply "
         "(`create` is checked when the object is new), relabelled, deleted"),
    Rule("apps", ("controllerrevisions",), ("list", "watch", "create", "patch", "delete"),
         "each revision's pod template (`<name>-<revision>`), recorded when the revision first appears: "
         "observed by label (a watch-fed cache), server-side applied, pruned to spec.revisionHistoryLimit"),
    Rule("", ("events",), ("create",), "Events on ModelDeployments"),
    Rule("monitoring.coreos.com", ("prometheusrules",), ("list", "watch", "create", "patch", "delete"),
         "each ModelDeployment's latency alerts (`<name>-latency`), where prometheus-operator's CRD exists: "
         "observed by label, server-side applied, deleted when no slo is set", needed=OPTIONAL),
    Rule("scheduling.k8s.io", ("podgroups",), ("list", "watch", "create", "patch", "delete"),
         "each multi-pod replica group's PodGroup (gang scheduling: its pods bound all together or none), "
         "where the cluster serves scheduling.k8s.io/v1alpha2", needed=OPTIONAL),
    Rule("", ("nodes",), ("list", "watch"),
         "gang admission by scheduling gates where the cluster serves no PodGroups: a multi-pod group is "
         "released when all its pods fit the nodes' free accelerators (with `list`/`watch` on pods in every "
         "namespace, which a cluster-wide install has)", cluster_scoped=True, needed=OPTIONAL),
    Rule("", ("secrets",), ("get",),
         "with per-namespace alerts tokens only (`--alerts-namespace-token-secret`): the Secret of that one "
         "name (`resourceNames`) in an alert's namespace, whose token may abort rollouts there", needed=OPTIONAL),
    Rule("apiextensions.k8s.io", ("customresourcedefinitions",), ("list", "watch"),
         "kopf notices the CRD being (re)installed", cluster_scoped=True, needed=CLUSTER_WIDE),
    Rule("", ("namespaces",), ("list", "watch"),
         "kopf's namespace discovery", cluster_scoped=True, needed=NAMESPACE_GLOBS),
)

_SCOPE_NOTE = {CLUSTER_WIDE: "cluster, `--all-namespaces` only", NAMESPACE_GLOBS: "cluster, namespace globs only",
               OPTIONAL: "optional: without it the feature is off"}


def markdown_table(rules: Iterable[Rule] = RULES) -> str:
    """The RBAC table of docs/helm.md."""
    lines = ["| resource | verbs | why |", "|---|---|---|"]
    for rule in rules:
        resource = ", ".join(f"`{r}`" for r in rule.resources)
        if rule.needed != ALWAYS:
            resource += f" ({_SCOPE_NOTE[rule.needed]})"
        lines.append(f"| {resource} | {', '.join(rule.verbs)} | {rule.why} |")
    return "\n".join(lines) + "\n"


def is_glob(namespace: str) -> bool:
    """kopf reads `*`, `?`, `[...]`, a leading `!` and commas in a namespace as a pattern."""
    return any(c in namespace for c in "*?[]!,")


def scans_namespaces(namespaces: Sequence[str]) -> bool:
    """Whether kopf must list and watch namespaces: only to resolve patterns. With exact names (or
    cluster-wide) it needs no namespace listing, and `settings.scanning.disabled` spares the operator
    the cluster-wide reads (and a minute of 403 retries without them)."""
    return any(is_glob(ns) for ns in namespaces)


@dataclass(frozen=True)
class Check:
    """One SelfSubjectAccessReview: may the operator `verb` `resource` in `namespace`?"""
    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str | None = None      # None: all namespaces (or a cluster-scoped resource)
    cluster_scoped: bool = False

    def what(self) -> str:
        resource = f"{self.resource}.{self.group}" if self.group else self.resource
        if self.subresource:
            resource += f"/{self.subresource}"
        if self.cluster_scoped:
            return f"{self.verb} {resource} (cluster-scoped)"
        where = f"in namespace {self.namespace}" if self.namespace else "in all namespaces"
        return f"{self.verb} {resource} {where}"


def required(namespaces: Sequence[str]) -> list[Check]:
    """Every check the operator needs for its scope: `namespaces` empty means cluster-wide."""
    cluster_wide = not namespaces
    globs = scans_namespaces(namespaces)
    # kopf watches the namespaces that patterns match, which the operator cannot check ahead: it checks
    # the exact names it was given, and for patterns it checks what it may do in all namespaces.
    where: list[str | None] = [None] if cluster_wide or globs else list(dict.fromkeys(namespaces))
    checks = []
    for rule in RULES:
        if (rule.needed == CLUSTER_WIDE and not cluster_wide or rule.needed == NAMESPACE_GLOBS and not globs
                or rule.needed == OPTIONAL):
            continue
        for resource in rule.resources:
            plural, _, subresource = resource.partition("/")
            for namespace in [None] if rule.cluster_scoped else where:
                for verb in rule.verbs:
                    checks.append(Check(verb, rule.group, plural, subresource, namespace, rule.cluster_scoped))
    return checks


def subject(username: str | None) -> str:
    """`ServiceAccount NS/NAME` for a service account's username, else `user NAME`."""
    if not username:
        return "the operator's user"
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
        return f"ServiceAccount {parts[2]}/{parts[3]}"
    return f"user {username}"


def missing_message(check: Check, username: str | None) -> str:
    """The line a user reads in the log and on /healthz: what is missing, for whom, where to grant it."""
    if check.cluster_scoped or check.namespace is None:
        grant = "grant it in the ClusterRole bound to it"
    else:
        grant = f"grant it in the Role bound to it in namespace {check.namespace} (or its ClusterRole)"
    return f"missing permission: {check.what()} ({subject(username)}): {grant}; docs/helm.md lists every rule"


class KopfRetries(logging.Handler):
    """Notes kopf's failed reads (`Request attempt #N failed; will retry: GET ...`), the only sign that
    one of its watches is retrying (say a 403 before a Role was fixed). A watch is taken as up again
    once a retry interval has passed without such a line."""

    def __init__(self, window: float = KOPF_RETRY_WINDOW, clock: Callable[[], float] = time.monotonic):
        super().__init__(logging.WARNING)
        self.window, self.clock = window, clock
        self.last: tuple[float, str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "will retry: GET " in message:
            self.last = (self.clock(), message.split("will retry: ", 1)[1].splitlines()[0][:300])

    def retrying(self) -> str | None:
        if self.last and self.clock() - self.last[0] < self.window:
            return self.last[1]
        return None


class Readiness:
    """What /healthz says: None when ready, else the one-line reason it is not."""

    def __init__(self, kopf_retries: KopfRetries | None = None) -> None:
        self.missing: list[str] | None = None     # None: not checked yet
        self.check_error: str | None = None
        self.listed = False
        self.list_error: str | None = None
        self.kopf_retries = kopf_retries
        self.standby = False   # a replica waiting for the leader Lease: ready once its permissions are

    def reason(self) -> str | None:
        if self.check_error:
            return f"cannot check permissions: {self.check_error}"
        if self.missing is None:
            return "starting: checking permissions"
        if self.missing:
            more = f" (and {len(self.missing) - 1} more missing; see the log)" if len(self.missing) > 1 else ""
            return self.missing[0] + more
        if self.standby:   # it serves /alerts (abort annotations, durable) while another replica leads
            return None
        retrying = self.kopf_retries and self.kopf_retries.retrying()
        if retrying:
            return f"starting: a watch is retrying: {retrying}"
        if not self.listed:
            return f"starting: {self.list_error}" if self.list_error else "starting: establishing watches"
        return None

    def ok(self) -> bool:
        return self.reason() is None


class Access:
    """The API calls behind the readiness: the operator's identity, the reviews, the first LISTs."""

    def __init__(self, api: client.ApiClient, dynamic_client, namespaces: Sequence[str],
                 logger: logging.Logger | None = None):
        self.api = api   # the operator's own client (also the leader election's)
        self.authorization = client.AuthorizationV1Api(api)
        self.authentication = client.AuthenticationV1Api(api)
        self.dyn = dynamic_client
        self.namespaces = list(dict.fromkeys(namespaces))
        self.checks = required(self.namespaces)
        self.log = logger or logging.getLogger("moe_operator")
        self._username: str | None = None

    def username(self) -> str | None:
        if self._username is None:
            try:
                review = self.authentication.create_self_subject_review(client.V1SelfSubjectReview())
                self._username = review.status.user_info.username
            except client.ApiException as error:
                self.log.debug("SelfSubjectReview failed: %s", error)
        return self._username

    def allowed(self, check: Check) -> bool:
        attributes = client.V1ResourceAttributes(verb=check.verb, group=check.group, resource=check.resource,
                                                 subresource=check.subresource or None,
                                                 namespace=check.namespace or None)
        review = self.authorization.create_self_subject_access_review(client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)))
        return bool(review.status.allowed)

    def missing(self) -> list[str]:
        """One message per permission the operator lacks (empty when it has them all). Raises
        ApiException (or a connection error) when the API server cannot answer."""
        missing = [check for check in self.checks if not self.allowed(check)]
        username = self.username() if missing else None
        return [missing_message(check, username) for check in missing]

    def list_watched(self) -> str | None:
        """LIST each watched kind in each watched namespace (what kopf's watches open with); None when
        all succeed, else what failed."""
        kinds = [(names.API_VERSION, names.KIND), ("v1", "Pod"), ("v1", "Service")]
        wanted = [None] if not self.namespaces or scans_namespaces(self.namespaces) else self.namespaces
        for api_version, kind in kinds:
            resource = self.dyn.resources.get(api_version=api_version, kind=kind)
            for namespace in wanted:
                try:
                    self.dyn.get(resource, namespace=namespace, limit=1)
                except Exception as error:
                    where = f"in namespace {namespace}" if namespace else "in all namespaces"
                    return f"cannot list {resource.name} {where}: {one_line(error)}"
        return None


def one_line(error: Exception) -> str:
    """An API error as one line: the API server's message when it sent one."""
    body = getattr(error, "body", None)
    if body:
        try:
            return " ".join(str(json.loads(body)["message"]).split())
        except (TypeError, ValueError, KeyError):
            pass
    if isinstance(error, client.ApiException):
        return f"{error.status} {error.reason}"
    return " ".join(str(error).split()) or type(error).__name__
