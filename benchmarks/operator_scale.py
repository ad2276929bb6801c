"""`python -m benchmarks.operator_scale [--quick]`: one operator against many ModelDeployments.

Brings up a devcluster of its own (a temporary state dir, torn down at the end) with N simulated
8-GPU nodes, runs one operator (all namespaces, resync 30 s), applies M ModelDeployments of 2 one-GPU
replica groups (builtin:tiny-mixtral on the simulated nodes) spread over the namespaces with one
`kubectl apply --server-side`, and measures:

- the time from the start of that apply until all M are Available;
- converged API traffic over a window: `apiserver_request_total` from the API server's /metrics,
  by verb (GET/LIST/WATCH; writes) and resource, with the operator running, then over a second
  window as long with the operator stopped (same objects, same cluster): the difference, over the
  kinds the operator may call (its ClusterRole, permission checks, discovery), is the operator's
  (kwok's node leases and status are not: the operator runs without --leader-elect);
- reconcile p50/p99 over the first window, from the operator's moe_operator_reconcile_duration_seconds
  histogram (every result);
- a wave of rollouts: 100 of the objects get a new runtime env in one apply; the time until each has
  promoted (status.stableRevision == currentRevision, a new revision, Available);
- the operator's RSS (VmRSS, and VmHWM, from /proc/<pid>/status).

Prints each figure beside its goal (issue 18) and whether it is met. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from moe_operator.api import names
from prometheus_client.parser import text_string_to_metric_families

from devcluster.cluster.control_plane import DevCluster
from devcluster.cluster.kwok import GPUS_PER_NODE, SIMULATED_LABEL
from devcluster.loopback import urlopen
from devcluster.testing import RunningCluster
from devtools.harness import install_crd, running_operator

READS = ("GET", "LIST", "WATCH")
WRITES = ("POST", "PUT", "PATCH", "APPLY", "DELETE", "DELETECOLLECTION")
NON_RESOURCE = "(non-resource URLs)"
# What the operator may call (its ClusterRole in the chart, its permission checks, discovery); without
# --leader-elect it touches no Lease. Other rows are the cluster's own components (kwok's node leases
# and status, the controllers' watches), shown summed.
OPERATOR_RESOURCES = frozenset({
    "modeldeployments", "pods", "services", "controllerrevisions", "events", "podgroups", "prometheusrules",
    "secrets", "customresourcedefinitions", "namespaces", "selfsubjectaccessreviews", NON_RESOURCE})
RESYNC_SECONDS = 30.0
REPLICAS = 2

# Goals (issue 18).
GOAL_READS_PER_S = 1.0
GOAL_WRITES_PER_S = 0.0
GOAL_P99_S = 0.1
GOAL_AVAILABLE_S = 120.0
GOAL_WAVE_S = 120.0
GOAL_RSS_MIB = 300.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def deployment(index: int, namespaces: int, wave: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"replicas": REPLICAS, "model": {"source": "builtin:tiny-mixtral"},
                            "resources": {"gpus": 1}, "scheduling": {"nodeSelector": {SIMULATED_LABEL: "true"}}}
    if wave is not None:
        spec["runtime"] = {"env": [{"name": "BENCH_WAVE", "value": wave}]}
    return {"apiVersion": names.API_VERSION, "kind": names.KIND,
            "metadata": {"name": f"md-{index:04d}", "namespace": f"scale-{index % namespaces}"}, "spec": spec}


def available(md: dict[str, Any]) -> bool:
    return any(c.get("type") == "Available" and c.get("status") == "True"
               for c in (md.get("status") or {}).get("conditions") or [])


def key(md: dict[str, Any]) -> str:
    return f"{md['metadata']['namespace']}/{md['metadata']['name']}"


# ---- metrics --------------------------------------------------------------------------------------

def samples(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of one metric's samples in Prometheus text."""
    found: dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                found[tuple(sorted(s.labels.items()))] = s.value
    return found


def delta(before: dict[tuple, float], after: dict[tuple, float]) -> dict[tuple, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def by_verb_resource(counts: dict[tuple, float]) -> dict[tuple[str, str], float]:
    """apiserver_request_total deltas summed per (verb, resource[/subresource]); non-resource URLs
    (discovery; /metrics, which the benchmark reads at each end of a window) as one row."""
    table: dict[tuple[str, str], float] = defaultdict(float)
    for labels, value in counts.items():
        d = dict(labels)
        resource = (d["resource"] + (f"/{d['subresource']}" if d.get("subresource") else "")
                    if d.get("resource") else NON_RESOURCE)
        table[(d.get("verb", "?"), resource)] += value
    return dict(table)


def quantile(buckets: dict[float, float], q: float) -> float:
    """histogram_quantile over cumulative bucket counts {upper bound: count} (Prometheus' method)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return bounds[-2] if len(bounds) > 1 else float("inf")
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-12)
        lower, below = bound, buckets[bound]
    return bounds[-1]


def reconcile_buckets(before: str, after: str) -> dict[float, float]:
    """The reconcile-duration histogram's cumulative buckets over (before, after), all results summed."""
    d = delta(samples(before, "moe_operator_reconcile_duration_seconds_bucket"),
              samples(after, "moe_operator_reconcile_duration_seconds_bucket"))
    every = set(samples(after, "moe_operator_reconcile_duration_seconds_bucket"))
    buckets: dict[float, float] = defaultdict(float)
    for labels in every:
        buckets[float(dict(labels)["le"])] += d.get(labels, 0.0)
    return dict(buckets)


def metric_sum(text: str, name: str, **match: str) -> float:
    return sum(v for labels, v in samples(text, name).items()
               if all(dict(labels).get(k) == want for k, want in match.items()))


class RssTimeline:
    """Samples a process's VmRSS every `interval` seconds in a daemon thread (bounded by the process's
    life): the peak, when it came (seconds since start, and the phase the benchmark was in), so a
    jump can be tied to what the operator was doing."""

    def __init__(self, pid: int, interval: float = 5.0):
        self.pid, self.interval, self.t0 = pid, interval, time.monotonic()
        self.phase = "start"
        self.samples: list[tuple[float, str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.samples.append((time.monotonic() - self.t0, self.phase, rss))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 1.0)

    def peak(self) -> tuple[float, str, float]:
        return max(self.samples, key=lambda s: s[2], default=(0.0, self.phase, 0.0))

    def by_phase(self) -> dict[str, float]:
        """The largest RSS seen in each phase, in the order the phases came."""
        out: dict[str, float] = {}
        for _, phase, rss in self.samples:
            out[phase] = max(out.get(phase, 0.0), rss)
        return out


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        field, _, rest = line.partition(":")
        if field in ("VmRSS", "VmHWM"):
            values[field] = int(rest.split()[0]) / 1024
    return values


# ---- the benchmark ------------------------------------------------------------------------------

class Bench:
    def __init__(self, cluster: RunningCluster, devcluster: DevCluster):
        self.cluster = cluster
        pki = devcluster.pki
        self.context = ssl.create_default_context(cafile=str(pki.ca_cert))
        self.context.load_cert_chain(str(pki.client_cert("admin")), str(pki.client_key("admin")))
        self.server = cluster.api_server_url
        self.lists = 0   # the benchmark's own LISTs of ModelDeployments (none inside the windows)

    def api(self, path: str, timeout: float = 60.0) -> bytes:
        with urlopen(f"{self.server}{path}", context=self.context, timeout=timeout) as response:
            return response.read()

    def apiserver_requests(self) -> dict[tuple, float]:
        return samples(self.api("/metrics").decode(), "apiserver_request_total")

    def deployments(self) -> list[dict[str, Any]]:
        self.lists += 1
        path = f"/apis/{names.GROUP}/{names.VERSION}/{names.PLURAL}"
        return json.loads(self.api(path))["items"]

    def wait(self, what: str, done: Callable[[list[dict]], tuple[int, int]], timeout: float,
             interval: float = 1.0) -> tuple[bool, float, int, int]:
        """Poll the ModelDeployments until done(items) says (n, n); returns (reached, seconds, n, of)."""
        start = time.monotonic()
        last_report = start
        while True:
            n, of = done(self.deployments())
            elapsed = time.monotonic() - start
            if n >= of:
                return True, elapsed, n, of
            if elapsed > timeout:
                log(f"timed out after {timeout:.0f} s waiting for {what}: {n} of {of}")
                return False, elapsed, n, of
            if time.monotonic() - last_report >= 10:
                log(f"  {what}: {n} of {of} after {elapsed:.0f} s")
                last_report = time.monotonic()
            time.sleep(interval)


def settle(op, timeout: float, quiet: float = 10.0) -> float:
    """Wait until the operator has made no write for `quiet` seconds and its queue is empty (bounded)."""
    start = time.monotonic()
    last_writes, last_change = None, start
    while time.monotonic() - start < timeout:
        _, text = op.get("/metrics")
        writes = metric_sum(text, "moe_operator_writes_total")
        depth = metric_sum(text, "moe_operator_workqueue_depth")
        now = time.monotonic()
        if writes != last_writes or depth:
            last_writes, last_change = writes, now
        elif now - last_change >= quiet:
            return now - start
        time.sleep(1.0)
    log(f"the operator still writing after {timeout:.0f} s; measuring anyway")
    return time.monotonic() - start


def fmt_rate(x: float) -> str:
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def run(args: argparse.Namespace) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="moe-operator-scale-"))
    devcluster = DevCluster(state_dir)
    ok = False
    wall = time.monotonic()
    try:
        log(f"devcluster in {state_dir}: {args.nodes} simulated {GPUS_PER_NODE}-GPU nodes")
        t = time.monotonic()
        devcluster.up(gpu_nodes=args.nodes, monitoring_enabled=False, timeout=max(120.0, 1.0 * args.nodes))
        up_s = time.monotonic() - t
        cluster = RunningCluster.of(devcluster)
        bench = Bench(cluster, devcluster)
        install_crd(cluster)
        for i in range(args.namespaces):
            cluster.kubectl("create", "namespace", f"scale-{i}")
        objects = [deployment(i, args.namespaces) for i in range(args.deployments)]
        manifest = yaml.safe_dump_all(objects)
        results: dict[str, Any] = {}

        with running_operator(cluster, namespaces=None, resync_seconds=RESYNC_SECONDS) as op:
            pid = op.process.pid
            timeline = RssTimeline(pid)
            results["rss_timeline"] = timeline
            timeline.phase = "apply"
            log(f"operator pid {pid} on port {op.port}; applying {args.deployments} ModelDeployments")
            _, before_apply = op.get("/metrics")
            t0 = time.monotonic()
            cluster.kubectl("apply", "--server-side", "-f", "-", input=manifest, timeout=600)
            results["apply_s"] = time.monotonic() - t0
            reached, _, n, of = bench.wait("Available", lambda items: (
                sum(available(md) for md in items), args.deployments), args.timeout)
            results["available"] = (reached, time.monotonic() - t0, n, of)
            log(f"{n} of {of} Available {results['available'][1]:.1f} s after the apply began")
            _, after_apply = op.get("/metrics")
            results["throttled_s"] = (metric_sum(after_apply, "moe_operator_client_throttled_seconds_total")
                                      - metric_sum(before_apply, "moe_operator_client_throttled_seconds_total"))
            results["apply_writes"] = delta(samples(before_apply, "moe_operator_writes_total"),
                                            samples(after_apply, "moe_operator_writes_total"))

            timeline.phase = "settle"
            results["settle_s"] = settle(op, timeout=max(RESYNC_SECONDS * 4, 120.0))
            log(f"settled {results['settle_s']:.0f} s later; converged window of {args.window:.0f} s")
            timeline.phase = "converged"
            api_before, (_, op_before), w0 = bench.apiserver_requests(), op.get("/metrics"), time.monotonic()
            time.sleep(args.window)
            api_after, (_, op_after), w1 = bench.apiserver_requests(), op.get("/metrics"), time.monotonic()
            results["window"] = (w1 - w0, by_verb_resource(delta(api_before, api_after)))
            results["buckets"] = reconcile_buckets(op_before, op_after)
            results["errors"] = (metric_sum(op_after, "moe_operator_reconcile_total", result="error")
                                 - metric_sum(op_before, "moe_operator_reconcile_total", result="error"))
            results["op_writes"] = (metric_sum(op_after, "moe_operator_writes_total")
                                    - metric_sum(op_before, "moe_operator_writes_total"))
            results["rss_converged"] = proc_status(pid)

            wave_size = min(args.wave, args.deployments)
            step = args.deployments / wave_size
            chosen = [int(i * step) for i in range(wave_size)]
            old = {key(md): (md.get("status") or {}).get("currentRevision") for md in bench.deployments()}
            wave_objects = [deployment(i, args.namespaces, wave="1") for i in chosen]
            wave_keys = {f"{o['metadata']['namespace']}/{o['metadata']['name']}" for o in wave_objects}
            log(f"wave: {wave_size} rollouts (a new runtime env) in one apply")

            def promoted(items: list[dict]) -> tuple[int, int]:
                done = 0
                for md in items:
                    if key(md) in wave_keys:
                        s = md.get("status") or {}
                        done += bool(s.get("currentRevision") and s.get("currentRevision") != old.get(key(md))
                                     and s.get("stableRevision") == s.get("currentRevision") and available(md))
                return done, wave_size

            timeline.phase = "wave"
            t0 = time.monotonic()
            cluster.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(wave_objects), timeout=600)
            reached, _, n, of = bench.wait("promoted", promoted, args.timeout)
            results["wave"] = (reached, time.monotonic() - t0, n, of)
            log(f"wave: {n} of {of} promoted {results['wave'][1]:.1f} s after its apply began")
            results["rss_wave"] = proc_status(pid)
            timeline.phase = "after the wave"
            settle(op, timeout=60.0, quiet=15.0)
            results["rss_end"] = proc_status(pid)
            timeline.stop()
            _, final = op.get("/metrics")
            results["errors_total"] = metric_sum(final, "moe_operator_reconcile_total", result="error")
            results["reconciles_total"] = metric_sum(final, "moe_operator_reconcile_total")

        background_s = args.window
        time.sleep(3.0)   # the operator's watches closed
        log(f"operator stopped; background window of {background_s:.0f} s")
        b_before, b0 = bench.apiserver_requests(), time.monotonic()
        time.sleep(background_s)
        b_after, b1 = bench.apiserver_requests(), time.monotonic()
        results["background"] = (b1 - b0, by_verb_resource(delta(b_before, b_after)))

        report(args, results, up_s)
        ok = True
        return 0
    finally:
        log("tearing the devcluster down")
        try:
            devcluster.down()
        finally:
            if ok and not args.keep_logs:
                shutil.rmtree(state_dir, ignore_errors=True)
            else:
                log(f"logs kept in {state_dir / 'logs'}")
            log(f"total run time {time.monotonic() - wall:.0f} s")


def report(args: argparse.Namespace, r: dict[str, Any], up_s: float) -> None:
    window_s, window = r["window"]
    background_s, background = r["background"]

    def operators(vr: tuple[str, str]) -> bool:
        return vr[1].split("/")[0] in OPERATOR_RESOURCES

    def classed(vr: tuple[str, str]) -> str:
        return "reads" if vr[0] in READS else "writes" if vr[0] in WRITES else vr[0]

    # rows: the operator's resources one by one, the rest summed per class of verb
    rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for column, (table, seconds) in enumerate(((window, window_s), (background, background_s))):
        for vr, count in table.items():
            row = vr if operators(vr) else (classed(vr), "(other resources)")
            rows[row][column] += count / seconds
    ordered = sorted(rows, key=lambda vr: (vr[1] == "(other resources)", vr[1], vr[0]))

    def operator_rate(verbs: tuple[str, ...]) -> float:
        return sum(rows[vr][0] - rows[vr][1] for vr in ordered if vr[0] in verbs and operators(vr))

    reads, writes = operator_rate(READS), operator_rate(WRITES)
    buckets = r["buckets"]
    count = buckets.get(float("inf"), 0.0)
    p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
    rss = max(r["rss_converged"]["VmRSS"], r["rss_wave"]["VmRSS"], r["rss_end"]["VmRSS"])
    hwm = r["rss_end"]["VmHWM"]
    a_ok, a_s, a_n, a_of = r["available"]
    w_ok, w_s, w_n, w_of = r["wave"]

    print()
    print(f"operator scale: {args.deployments} ModelDeployments x {REPLICAS} one-GPU groups "
          f"({args.deployments * REPLICAS} pods) in {args.namespaces} namespaces, {args.nodes} simulated "
          f"{GPUS_PER_NODE}-GPU nodes; one operator, all namespaces, resync {RESYNC_SECONDS:.0f} s")
    print(f"(devcluster up {up_s:.0f} s; kubectl apply of all {args.deployments} took {r['apply_s']:.1f} s; "
          f"its requests waited {r['throttled_s']:.0f} s in all for the client-side rate limit until all "
          f"Available; settled "
          f"{r['settle_s']:.0f} s before the {window_s:.0f} s window; {count:.0f} reconciles in it, "
          f"{r['errors']:.0f} errors, {r['op_writes']:.0f} writes by the operator's own count; over the whole "
          f"run {r['reconciles_total']:.0f} reconciles, {r['errors_total']:.0f} errors)")
    print()
    print(f"API requests per second (apiserver_request_total), converged: with the operator ({window_s:.0f} s), "
          f"without it ({background_s:.0f} s, same objects), the difference")
    print(f"  {'verb':<8} {'resource':<28} {'with':>8} {'without':>8} {'operator':>9}")
    for vr in ordered:
        w, b = rows[vr]
        share = fmt_rate(w - b) if operators(vr) else "-"
        print(f"  {vr[0]:<8} {vr[1]:<28} {fmt_rate(w):>8} {fmt_rate(b):>8} {share:>9}")
    print("  (a WATCH is counted when it ends; other components' watches ending make the noise of +-0.05/s)")
    print()

    def line(figure: str, measured: str, goal: str, met: bool) -> None:
        print(f"  {figure:<44} {measured:<26} {goal:<14} {'yes' if met else 'NO'}")

    print(f"  {'figure':<44} {'measured':<26} {'goal':<14} met")
    line(f"all {args.deployments} Available, from the first apply",
         f"{a_s:.1f} s" if a_ok else f"{a_n} of {a_of} after {a_s:.0f} s", f"<= {GOAL_AVAILABLE_S:.0f} s",
         a_ok and a_s <= GOAL_AVAILABLE_S)
    line("converged API reads/s (GET+LIST+WATCH)", fmt_rate(reads), f"<= {GOAL_READS_PER_S:g}",
         reads <= GOAL_READS_PER_S)
    line("converged API writes/s", fmt_rate(writes), "0", writes <= GOAL_WRITES_PER_S + 0.01)
    line("reconcile p50 / p99 (converged window)", f"{p50 * 1000:.0f} ms / {p99 * 1000:.0f} ms",
         f"p99 < {GOAL_P99_S * 1000:.0f} ms", p99 < GOAL_P99_S)
    line(f"wave of {w_of} rollouts promoted", f"{w_s:.1f} s" if w_ok else f"{w_n} of {w_of} after {w_s:.0f} s",
         f"<= {GOAL_WAVE_S:.0f} s", w_ok and w_s <= GOAL_WAVE_S)
    line("operator RSS (VmRSS max seen; VmHWM)", f"{rss:.0f} MiB; peak {hwm:.0f} MiB", f"< {GOAL_RSS_MIB:.0f} MiB",
         hwm < GOAL_RSS_MIB)
    line("reconcile errors (whole run)", f"{r['errors_total']:.0f} of {r['reconciles_total']:.0f}", "0",
         r["errors_total"] == 0)
    writes = r["apply_writes"]
    total = sum(writes.values())
    print(f"  the operator's writes from the apply until all Available: {total:.0f} "
          f"({total / max(args.deployments, 1):.1f} per ModelDeployment): "
          + ", ".join(f"{dict(k).get('kind', '?')} {dict(k).get('verb', '?')} {v:.0f}"
                      for k, v in sorted(writes.items(), key=lambda kv: -kv[1])))
    timeline = r["rss_timeline"]
    at, phase, peak = timeline.peak()
    print(f"  RSS by phase (MiB, sampled every {timeline.interval:.0f} s): "
          + ", ".join(f"{name} {mib:.0f}" for name, mib in timeline.by_phase().items())
          + f"; the largest sample {peak:.0f} MiB at {at:.0f} s ({phase})")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.operator_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--deployments", type=int, default=500, help="ModelDeployments (default 500)")
    p.add_argument("--nodes", type=int, default=200, help="simulated 8-GPU nodes (default 200)")
    p.add_argument("--namespaces", type=int, default=10, help="namespaces they are spread over (default 10)")
    p.add_argument("--window", type=float, default=120.0, help="converged measurement window, s (default 120)")
    p.add_argument("--wave", type=int, default=100, help="rollouts in the wave (default 100, at most all)")
    p.add_argument("--timeout", type=float, default=600.0, help="bound on each wait, s (default 600)")
    p.add_argument("--keep-logs", action="store_true", help="keep the cluster's state dir (its logs) afterwards")
    p.add_argument("--quick", action="store_true", help="50 deployments, 20 nodes, 30 s window")
    args = p.parse_args(argv)
    if args.quick:
        args.deployments, args.nodes, args.window = 50, 20, 30.0
    need = args.deployments * REPLICAS + min(args.wave, args.deployments)   # + one group's surge per rollout
    if need > args.nodes * GPUS_PER_NODE:
        p.error(f"{args.deployments} deployments and a wave of {args.wave} need {need} GPUs; "
                f"{args.nodes} nodes have {args.nodes * GPUS_PER_NODE}")
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, so the cluster is torn down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
