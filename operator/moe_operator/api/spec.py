"""The typed ModelDeployment: `ModelDeployment.from_body(body)`.

The CRD (crds/modeldeployments.yaml) is the source of the schema, its defaults and its validation;
this module mirrors the defaults (a unit test checks both agree) so that the operator reads a spec
the same way whether or not the API server defaulted it (e.g. an object stored under an older CRD).
Whatever the CRD cannot check is checked here and raised as `SpecError`, which the reconcile turns
into the `InvalidSpec` condition.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .names import MAX_NAME_LENGTH

DTYPES = ("float32", "bfloat16", "float16")
STRATEGIES = ("Canary", "BlueGreen")
AUTOSCALING_METRICS = ("requestsWaiting", "kvCacheUsage", "ttftP99", "PromQL")
DURING_ROLLOUT = ("Follow", "Freeze")
SOURCE_SCHEMES = ("pvc://", "hostpath://", "hf://", "builtin:")

DEFAULT_IMAGE = "ghcr.io/moe-operator/runtime:0.1.0"
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GRACE_SECONDS = 60
DEFAULT_PROGRESS_DEADLINE_SECONDS = 600
DEFAULT_REVISION_HISTORY_LIMIT = 10
DEFAULT_DRAIN_SECONDS = 5          # out of rotation this long before SIGTERM (kube-proxy's sync period)
DRAIN_EXIT_MARGIN_SECONDS = 5      # of the grace period, left to the process to exit after its drain

# Flags the operator sets itself; runtime.args may not repeat them (the CRD refuses them too).
RESERVED_FLAGS = ("--model", "--served-model-name", "--http-port", "--grpc-port", "--dtype", "--host",
                  "--drain-timeout")
# Env names the operator sets itself (downward API and rank).
RESERVED_ENV = ("POD_IP", "POD_NAME", "POD_NAMESPACE", "MOE_RANK", "MOE_WORLD_SIZE", "MOE_REVISION")

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PVC = re.compile(r"^pvc://([a-z0-9]([-a-z0-9.]*[a-z0-9])?)(/.*)?$")
_HF = re.compile(r"^hf://([A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*)(@([-A-Za-z0-9_./]+))?$")
_BUILTIN = re.compile(r"^builtin:[a-z0-9][-a-z0-9.]*$")


class SpecError(ValueError):
    """A spec the operator cannot act on; `field` names the offending field for the user."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_duration(text: str, field_name: str = "duration") -> float:
    """Seconds in a Go-style duration string (`30s`, `1m30s`, `500ms`, `0`)."""
    text = str(text).strip()
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise SpecError(field_name, f"{text!r} is not a duration like 30s, 5m or 1h30m")
    return total


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from; `scheme` is one of pvc, hostpath, hf, builtin."""

    uri: str
    scheme: str
    claim: str | None = None       # pvc://CLAIM/PATH
    path: str = ""                 # pvc: path inside the claim; hostpath: absolute host path
    repo: str | None = None        # hf://ORG/NAME
    revision: str | None = None    # hf://ORG/NAME@REV

    @classmethod
    def parse(cls, uri: str) -> ModelSource:
        f = "spec.model.source"
        if uri.startswith("pvc://"):
            m = _PVC.match(uri)
            if not m:
                raise SpecError(f, f"{uri!r}: expected pvc://CLAIM/PATH with a DNS-1123 claim name")
            return cls(uri, "pvc", claim=m.group(1), path=(m.group(3) or "/").lstrip("/"))
        if uri.startswith("hostpath://"):
            path = uri[len("hostpath://"):]
            if not path.startswith("/") or len(path) < 2 or "/../" in path + "/":
                raise SpecError(f, f"{uri!r}: expected hostpath:///ABSOLUTE/PATH (three slashes)")
            return cls(uri, "hostpath", path=path.rstrip("/") or "/")
        if uri.startswith("hf://"):
            m = _HF.match(uri)
            if not m:
                raise SpecError(f, f"{uri!r}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION")
            return cls(uri, "hf", repo=m.group(1), revision=m.group(3))
        if uri.startswith("builtin:"):
            if not _BUILTIN.match(uri):
                raise SpecError(f, f"{uri!r}: expected builtin:NAME, e.g. builtin:tiny-deepseek-v3")
            return cls(uri, "builtin")
        raise SpecError(f, f"{uri!r}: the scheme must be one of {', '.join(SOURCE_SCHEMES)}")


@dataclass(frozen=True)
class ModelSpec:
    source: ModelSource
    served_name: str
    dtype: str = "bfloat16"
    cache_claim: str | None = None   # hf:// downloads kept in this PVC, shared by pods and revisions


@dataclass(frozen=True)
class RuntimeSpec:
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    args: tuple[str, ...] = ()
    env: tuple[Mapping[str, Any], ...] = ()
    startup_timeout_seconds: int | None = None   # None: sized from the model source (pods.py)
    termination_grace_period_seconds: int = DEFAULT_GRACE_SECONDS
    drain_seconds_set: int | None = None         # runtime.drainSeconds as written (None: derived)

    @property
    def drain_seconds(self) -> int:
        """How long a group stays out of rotation before its pods get SIGTERM, so that every proxy
        (kube-proxy syncs its rules about once a second, cloud load balancers slower) has dropped it."""
        if self.drain_seconds_set is not None:
            return self.drain_seconds_set
        return min(DEFAULT_DRAIN_SECONDS, self.termination_grace_period_seconds)

    @property
    def drain_timeout_seconds(self) -> int:
        """The runtime's --drain-timeout: after SIGTERM, how long requests in flight may still take,
        inside the grace period (a margin is left for the process to exit before SIGKILL)."""
        grace = self.termination_grace_period_seconds
        return max(1, grace - DRAIN_EXIT_MARGIN_SECONDS) if grace > DRAIN_EXIT_MARGIN_SECONDS else max(grace, 1)


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    gpu_resource: str = DEFAULT_GPU_RESOURCE
    cpu: str | None = None
    memory: str | None = None


@dataclass(frozen=True)
class SchedulingSpec:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str | None = None
    affinity: Mapping[str, Any] | None = None             # the pod's affinity, as written
    topology_spread_constraints: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class CanaryStep:
    set_weight: int | None = None
    pause_seconds: float | None = None   # for a pause step: None = until promoted
    is_pause: bool = False

    def describe(self) -> str:
        """`setWeight 25`, `pause 30s` or `pause (until promoted)`, as `kubectl moe status` shows it."""
        if not self.is_pause:
            return f"setWeight {self.set_weight}"
        return f"pause {self.pause_seconds:g}s" if self.pause_seconds is not None else "pause (until promoted)"


@dataclass(frozen=True)
class BlueGreenSpec:
    preview_replicas: int = 1
    auto_promotion_seconds: int | None = None
    scale_down_delay_seconds: int = 30


@dataclass(frozen=True)
class SLOSpec:
    p99_latency_ms: float | None = None
    ttft_p99_ms: float | None = None
    max_error_rate: float | None = None


@dataclass(frozen=True)
class AnalysisSpec:
    interval_seconds: float = 10.0
    slo: SLOSpec = SLOSpec()
    alerts: Mapping[str, Any] = field(default_factory=dict)
    prometheus: Mapping[str, Any] | None = None
    failure_limit: int = 1              # failed intervals tolerated; one more aborts
    inconclusive_limit: int = 3         # inconclusive intervals in a row before the rollout pauses/aborts
    min_samples: int = 10               # finished requests per interval for a conclusive measurement
    on_inconclusive: str = "Pause"      # Pause | Abort
    stable_ratio: float | None = None   # also fail when new p99 > ratio x stable p99

    @property
    def prometheus_url(self) -> str | None:
        return (self.prometheus or {}).get("url")

    @property
    def prometheus_selector(self) -> str | None:
        return (self.prometheus or {}).get("selector")

    @property
    def judges_anything(self) -> bool:
        s = self.slo
        return any(v is not None for v in (s.p99_latency_ms, s.ttft_p99_ms, s.max_error_rate)) \
            or self.stable_ratio is not None


@dataclass(frozen=True)
class RolloutSpec:
    strategy: str = "Canary"
    steps: tuple[CanaryStep, ...] = ()
    blue_green: BlueGreenSpec = BlueGreenSpec()
    max_surge_gpus: int | None = None   # None: one replica group's GPUs
    progress_deadline_seconds: int = DEFAULT_PROGRESS_DEADLINE_SECONDS
    analysis: AnalysisSpec = AnalysisSpec()
    paused: bool = False                   # hold the steps (the GitOps way to pause)
    progress_deadline_abort: bool = False  # abort instead of pausing when the deadline passes


@dataclass(frozen=True)
class AutoscalingSpec:
    min_replicas: int = 1
    max_replicas: int = 1
    metric: str = "requestsWaiting"
    target: float = 4.0
    query: str | None = None
    scale_up_stabilization_seconds: float = 0.0
    scale_down_stabilization_seconds: float = 300.0
    interval_seconds: float = 15.0
    tolerance: float = 0.1
    cold_start_allowance_seconds: float = 600.0
    during_rollout: str = "Follow"            # Follow | Freeze
    prometheus: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ModelDeployment:
    """A ModelDeployment as the operator reads it: identity, the typed spec, and the last status."""

    name: str
    namespace: str
    uid: str
    generation: int
    replicas: int
    model: ModelSpec
    runtime: RuntimeSpec = RuntimeSpec()
    resources: ResourcesSpec = ResourcesSpec()
    pods_per_replica: int = 1
    group_domain: str | None = None        # a node label: every pod of one group in one of its domains
    scheduling: SchedulingSpec = SchedulingSpec()
    rollout: RolloutSpec = RolloutSpec()
    autoscaling: AutoscalingSpec | None = None
    revision_history_limit: int = DEFAULT_REVISION_HISTORY_LIMIT
    status: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def gpus_per_group(self) -> int:
        return self.resources.gpus * self.pods_per_replica

    @property
    def surge_gpus(self) -> int:
        """GPUs a rollout may add above the steady state (default: one replica group's worth)."""
        ms = self.rollout.max_surge_gpus
        return self.gpus_per_group if ms is None else ms

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ModelDeployment:
        """Read a ModelDeployment body (a dict or kopf Body); raise SpecError if it cannot be acted on."""
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        name = meta.get("name", "")
        if len(name) > MAX_NAME_LENGTH or not _DNS_1035.match(name):
            raise SpecError(
                "metadata.name",
                f"{name!r} must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
                "so that <name>-stable, <name>-canary and <name>-preview are valid Service names",
            )
        replicas = _int(spec, "replicas", 1, "spec.replicas", minimum=0)
        rollout = _rollout(spec.get("rollout") or {})
        md = cls(
            name=name,
            namespace=meta.get("namespace", "default"),
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation") or 0),
            replicas=replicas,
            model=_model(spec.get("model"), name),
            rollout=rollout,
            autoscaling=_autoscaling(spec.get("autoscaling")),
            revision_history_limit=_int(spec, "revisionHistoryLimit", DEFAULT_REVISION_HISTORY_LIMIT,
                                        "spec.revisionHistoryLimit", minimum=0),
            status=dict(body.get("status") or {}),
        )
        md = md.with_template(spec)
        if rollout.max_surge_gpus is None and rollout.strategy == "BlueGreen":
            # Blue-green switches back at once only while the whole old revision is still there:
            # by default its budget holds a second copy (as Argo Rollouts scales a full preview).
            md = replace(md, rollout=replace(rollout, max_surge_gpus=replicas * md.gpus_per_group))
        return md

    def with_template(self, template: Mapping[str, Any]) -> ModelDeployment:
        """This ModelDeployment with the pod-template fields (model, runtime, resources, topology,
        scheduling) of `template`: a spec, or the template a revision was recorded with. Pods of a
        revision are built from its own template, whatever the spec says now."""
        topology = template.get("topology") or {}
        return replace(
            self,
            model=_model(template.get("model"), self.name),
            runtime=_runtime(template.get("runtime") or {}),
            resources=_resources(template.get("resources") or {}),
            pods_per_replica=_int(topology, "podsPerReplica", 1, "spec.topology.podsPerReplica", minimum=1),
            group_domain=_label_key(topology.get("groupDomain"), "spec.topology.groupDomain"),
            scheduling=_scheduling(template.get("scheduling") or {}),
        )

    @property
    def ranks_per_group(self) -> int:
        """Runtime ranks of one replica: one per GPU (one per pod without GPUs), over its pods."""
        return self.pods_per_replica * max(self.resources.gpus, 1)


def _int(obj: Mapping, key: str, default: int | None, field_name: str, minimum: int | None = None,
         maximum: int | None = None) -> int | None:
    value = obj.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field_name, f"{value!r} is not an integer")
    if minimum is not None and value < minimum:
        raise SpecError(field_name, f"{value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise SpecError(field_name, f"{value} is above the maximum {maximum}")
    return value


def _quantity(value: Any) -> str | None:
    return None if value is None else str(value)


def _model(model: Mapping | None, name: str) -> ModelSpec:
    if not model or not model.get("source"):
        raise SpecError("spec.model.source", "is required (pvc://, hostpath://, hf:// or builtin:)")
    dtype = model.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        raise SpecError("spec.model.dtype", f"{dtype!r} must be one of {', '.join(DTYPES)}")
    source = ModelSource.parse(model["source"])
    cache = model.get("cache")
    claim = None
    if cache is not None:
        claim = (cache or {}).get("claimName") if isinstance(cache, Mapping) else None
        if not isinstance(claim, str) or not _DNS_1123.match(claim):
            raise SpecError("spec.model.cache.claimName", f"{claim!r} is not a PersistentVolumeClaim name")
        if source.scheme != "hf":
            raise SpecError("spec.model.cache", f"caches hf:// downloads; {source.uri} is not downloaded")
    return ModelSpec(source, model.get("servedName") or name, dtype, claim)


def _runtime(rt: Mapping) -> RuntimeSpec:
    args = tuple(str(a) for a in rt.get("args") or ())
    for arg in args:
        if arg.split("=", 1)[0] in RESERVED_FLAGS:
            raise SpecError("spec.runtime.args", f"{arg!r} is set by the operator from spec.model")
    env = tuple(dict(e) for e in rt.get("env") or ())
    for e in env:
        if e.get("name") in RESERVED_ENV:
            raise SpecError("spec.runtime.env", f"{e.get('name')} is set by the operator")
    return RuntimeSpec(
        image=rt.get("image") or DEFAULT_IMAGE,
        image_pull_policy=rt.get("imagePullPolicy", "IfNotPresent"),
        args=args,
        env=env,
        startup_timeout_seconds=_int(rt, "startupTimeoutSeconds", None, "spec.runtime.startupTimeoutSeconds",
                                     minimum=1),
        termination_grace_period_seconds=_int(
            rt, "terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS,
            "spec.runtime.terminationGracePeriodSeconds", minimum=0),
        drain_seconds_set=_int(rt, "drainSeconds", None, "spec.runtime.drainSeconds", minimum=0),
    )


def _resources(res: Mapping) -> ResourcesSpec:
    return ResourcesSpec(
        gpus=_int(res, "gpus", 1, "spec.resources.gpus", minimum=0),
        gpu_resource=res.get("gpuResource") or DEFAULT_GPU_RESOURCE,
        cpu=_quantity(res.get("cpu")),
        memory=_quantity(res.get("memory")),
    )


def _scheduling(sch: Mapping) -> SchedulingSpec:
    affinity = sch.get("affinity")
    if affinity is not None and not isinstance(affinity, Mapping):
        raise SpecError("spec.scheduling.affinity", "must be an object (a pod's affinity)")
    spread = sch.get("topologySpreadConstraints") or ()
    if not isinstance(spread, list | tuple) or not all(isinstance(c, Mapping) for c in spread):
        raise SpecError("spec.scheduling.topologySpreadConstraints", "must be a list of objects")
    return SchedulingSpec(
        node_selector={str(k): str(v) for k, v in (sch.get("nodeSelector") or {}).items()},
        tolerations=tuple(dict(t) for t in sch.get("tolerations") or ()),
        priority_class_name=sch.get("priorityClassName"),
        affinity=dict(affinity) if affinity else None,
        topology_spread_constraints=tuple(dict(c) for c in spread),
    )


_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def _label_key(value: Any, field_name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 316 or not _LABEL_KEY.match(value):
        raise SpecError(field_name, f"{value!r} is not a node label key (e.g. topology.kubernetes.io/zone)")
    return value


def _rollout(ro: Mapping) -> RolloutSpec:
    strategy = ro.get("strategy", "Canary")
    if strategy not in STRATEGIES:
        raise SpecError("spec.rollout.strategy", f"{strategy!r} must be Canary or BlueGreen")
    steps = []
    weights = []
    for i, step in enumerate((ro.get("canary") or {}).get("steps") or ()):
        f = f"spec.rollout.canary.steps[{i}]"
        if ("setWeight" in step) == ("pause" in step):
            raise SpecError(f, "a step has exactly one of setWeight or pause")
        if "setWeight" in step:
            w = _int(step, "setWeight", None, f + ".setWeight", minimum=0, maximum=100)
            if weights and w <= weights[-1]:
                raise SpecError(f + ".setWeight", f"{w} must be above the previous weight {weights[-1]}")
            weights.append(w)
            steps.append(CanaryStep(set_weight=w))
        else:
            duration = (step.get("pause") or {}).get("duration")
            seconds = None if duration is None else parse_duration(duration, f + ".pause.duration")
            steps.append(CanaryStep(pause_seconds=seconds, is_pause=True))
    bg = ro.get("blueGreen") or {}
    analysis = ro.get("analysis") or {}
    slo = analysis.get("slo") or {}
    return RolloutSpec(
        strategy=strategy,
        steps=tuple(steps),
        blue_green=BlueGreenSpec(
            preview_replicas=_int(bg, "previewReplicas", 1, "spec.rollout.blueGreen.previewReplicas", minimum=0),
            auto_promotion_seconds=_int(bg, "autoPromotionSeconds", None,
                                        "spec.rollout.blueGreen.autoPromotionSeconds", minimum=0),
            scale_down_delay_seconds=_int(bg, "scaleDownDelaySeconds", 30,
                                          "spec.rollout.blueGreen.scaleDownDelaySeconds", minimum=0),
        ),
        max_surge_gpus=_int(ro, "maxSurgeGPUs", None, "spec.rollout.maxSurgeGPUs", minimum=0),
        progress_deadline_seconds=_int(ro, "progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE_SECONDS,
                                       "spec.rollout.progressDeadlineSeconds", minimum=1),
        analysis=AnalysisSpec(
            interval_seconds=parse_duration(analysis.get("interval", "10s"), "spec.rollout.analysis.interval"),
            slo=SLOSpec(
                p99_latency_ms=slo.get("p99LatencyMs"),
                ttft_p99_ms=slo.get("ttftP99Ms"),
                max_error_rate=slo.get("maxErrorRate"),
            ),
            alerts=dict(analysis.get("alerts") or {}),
            prometheus=dict(analysis["prometheus"]) if analysis.get("prometheus") else None,
            failure_limit=_int(analysis, "failureLimit", 1, "spec.rollout.analysis.failureLimit", minimum=0),
            inconclusive_limit=_int(analysis, "inconclusiveLimit", 3, "spec.rollout.analysis.inconclusiveLimit",
                                    minimum=1),
            min_samples=_int(analysis, "minSamples", 10, "spec.rollout.analysis.minSamples", minimum=1),
            on_inconclusive=_choice(analysis, "inconclusive", ("Pause", "Abort"), "spec.rollout.analysis.inconclusive"),
            stable_ratio=_ratio(analysis.get("stableRatio")),
        ),
        paused=bool(ro.get("paused", False)),
        progress_deadline_abort=bool(ro.get("progressDeadlineAbort", False)),
    )


def _choice(obj: Mapping, key: str, choices: tuple[str, ...], field_name: str) -> str:
    value = obj.get(key, choices[0])
    if value not in choices:
        raise SpecError(field_name, f"{value!r} must be one of {', '.join(choices)}")
    return value


def _ratio(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 1:
        raise SpecError("spec.rollout.analysis.stableRatio", f"{value!r} must be a number above 1 (e.g. 1.5)")
    return float(value)


def _autoscaling(auto: Mapping | None) -> AutoscalingSpec | None:
    if auto is None:
        return None
    f = "spec.autoscaling"
    lo = _int(auto, "minReplicas", 1, f + ".minReplicas", minimum=1)
    hi = _int(auto, "maxReplicas", None, f + ".maxReplicas", minimum=1)
    if hi is None:
        raise SpecError(f + ".maxReplicas", "is required")
    if lo > hi:
        raise SpecError(f, f"minReplicas {lo} is above maxReplicas {hi}")
    metric = auto.get("metric", "requestsWaiting")
    if metric not in AUTOSCALING_METRICS:
        raise SpecError(f + ".metric", f"{metric!r} must be one of {', '.join(AUTOSCALING_METRICS)}")
    if (metric == "PromQL") != bool(auto.get("query")):
        raise SpecError(f + ".query", "is required with metric PromQL and only with it")
    prometheus = dict(auto["prometheus"]) if auto.get("prometheus") else None
    if metric == "PromQL" and not (prometheus or {}).get("url"):
        raise SpecError(f + ".prometheus.url", "is required with metric PromQL")
    during = auto.get("duringRollout", "Follow")
    if during not in DURING_ROLLOUT:
        raise SpecError(f + ".duringRollout", f"{during!r} must be one of {', '.join(DURING_ROLLOUT)}")
    tolerance = float(auto.get("tolerance", 0.1))
    if not 0 <= tolerance < 1:
        raise SpecError(f + ".tolerance", f"{tolerance} must be at least 0 and below 1")
    return AutoscalingSpec(
        min_replicas=lo,
        max_replicas=hi,
        metric=metric,
        target=float(auto.get("target", 4)),
        query=auto.get("query"),
        scale_up_stabilization_seconds=parse_duration(auto.get("scaleUpStabilization", "0s"),
                                                      f + ".scaleUpStabilization"),
        scale_down_stabilization_seconds=parse_duration(auto.get("scaleDownStabilization", "5m"),
                                                        f + ".scaleDownStabilization"),
        interval_seconds=max(parse_duration(auto.get("interval", "15s"), f + ".interval"), 0.1),
        tolerance=tolerance,
        cold_start_allowance_seconds=parse_duration(auto.get("coldStartAllowance", "10m"),
                                                    f + ".coldStartAllowance"),
        during_rollout=during,
        prometheus=prometheus,
    )
