"""GPU arithmetic and the layout of replica groups: from counts (how many stable, how many new, which
in rotation) to the groups of a plan, within `replicas x GPUs per group + maxSurgeGPUs`.

- GPUs: a pod is created only if the GPUs of every pod that exists (terminating ones included, they
  still hold theirs) plus the new one stay within the budget. When that blocks the new revision,
  stable groups leave rotation and go first, but never below what the current weight needs; groups
  kept warm (old revision after a switch, an aborted canary) go early.
- Rotation: a new group enters rotation only when all its pods are ready; a group leaves rotation
  and is deleted only after the drain period (so proxies stop sending before SIGTERM).
- A group whose pods do not run its revision's template is replaced, never taking away the last
  ready group in rotation.
- A multi-pod group that lost a rank (`Group.broken`) cannot serve: it leaves rotation at once and
  is deleted, and a new group takes its place (LeaderWorkerSet's RecreateGroupOnPodRestart); from the
  second re-creation in a row on, new groups of that revision wait out a back-off (restarts.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..api import names
from ..api.spec import ModelDeployment
from ..world.observe import Group, Observed, ObservedPod
from ..world.plan import GroupPlan
from .restarts import held, restarts_now

# --- arithmetic of weights and GPUs --------------------------------------------------------------

def canary_groups_for(weight: int, replicas: int) -> tuple[int, int]:
    """(canary groups, stable groups) in rotation for a weight. Coarse with few replicas: a weight
    above 0 gets at least one canary group, a weight below 100 keeps at least one stable group."""
    n = replicas
    if weight <= 0 or n == 0:
        return 0, n
    if weight >= 100:
        return n, 0
    canary = max(1, round(weight * n / 100))
    if n > 1:
        canary = min(canary, n - 1)
    return canary, max(n - canary, 1)


def achieved_weight(groups: Iterable[GroupPlan], new_revision: str) -> int | None:
    rotating = [g for g in groups if g.in_rotation]
    if not rotating:
        return 0
    return round(100 * sum(g.revision == new_revision for g in rotating) / len(rotating))


def pod_gpus(pod: ObservedPod, md: ModelDeployment) -> int:
    """GPUs a pod holds (its containers' limits; its revision's value when the body has none)."""
    spec = (pod.body or {}).get("spec")
    if not spec:
        return md.resources.gpus
    total = 0
    for c in spec.get("containers") or ():
        limits = (c.get("resources") or {}).get("limits") or {}
        total += int(limits.get(md.resources.gpu_resource, 0) or 0)
    return total


def group_gpus(md: ModelDeployment, observed: Observed, revision: str | None) -> int:
    """GPUs one group of `revision` takes, by its own template (the spec's for an unknown one)."""
    if revision is None:
        return md.gpus_per_group
    return observed.size_of(revision) * observed.gpus.get(revision, md.resources.gpus)


def gpu_budget(md: ModelDeployment) -> int:
    return md.replicas * md.gpus_per_group + md.surge_gpus


def gpus_in_use(md: ModelDeployment, observed: Observed) -> int:
    """Every pod that holds GPUs: live and terminating (a terminating pod has not released its GPUs)."""
    return sum(pod_gpus(p, md) for p in observed.pods if p.phase not in ("Failed", "Succeeded"))


# --- layout: from counts to groups ---------------------------------------------------------------

def _rank(groups: Iterable[Group]) -> list[Group]:
    """Ready groups first, then complete ones, then those in rotation, then low replica indices."""
    return sorted(groups, key=lambda g: (not g.ready, not g.complete, not g.in_rotation, g.replica))


def _free_indices(used: Iterable[int], count: int) -> list[int]:
    taken, out, i = set(used), [], 0
    while len(out) < count:
        if i not in taken:
            out.append(i)
        i += 1
    return out


@dataclass
class _Layout:
    md: ModelDeployment
    observed: Observed
    free: int                                  # GPUs that may still be taken now
    now: float = 0.0
    groups: list[GroupPlan] = field(default_factory=list)
    blocked: bool = False                      # something wanted could not be created for lack of GPUs
    held: Mapping[str, float] = field(default_factory=dict)   # revisions in back-off: {revision: until}

    def keep(self, g: Group, track: str, in_rotation: bool) -> None:
        cost = (g.size - len(g.pods)) * self.observed.gpus.get(g.revision, self.md.resources.gpus)
        if cost > self.free:
            # An incomplete group whose missing pods do not fit: it cannot serve, so it goes (and is
            # made again, whole, when GPUs are free) rather than waiting half-made.
            self.blocked = True
            self.remove(g)
            return
        self.free -= cost
        self.groups.append(GroupPlan(g.revision, g.replica, track, in_rotation and g.ready))

    def create(self, revision: str, replica: int, track: str) -> bool:
        if revision in self.held:              # its groups keep failing: made when the back-off ends
            return False
        cost = group_gpus(self.md, self.observed, revision)
        if cost > self.free:
            self.blocked = True
            return False
        self.free -= cost
        self.groups.append(GroupPlan(revision, replica, track, in_rotation=False))
        return True

    def remove(self, g: Group) -> None:
        """Out of rotation first; deleted (left out of the plan) once it has been out of rotation for
        the drain period, so that every proxy has dropped it before its pods get SIGTERM."""
        since = self.now if g.in_rotation else g.out_of_rotation_since
        until = None if since is None else since + self.md.runtime.drain_seconds
        if g.in_rotation or (until is not None and self.now < until):
            self.groups.append(GroupPlan(g.revision, g.replica, g.track, in_rotation=False, draining=True,
                                         drain_until=until))

    def linger(self, g: Group) -> None:
        """Kept, warm, out of rotation (an old revision after a switch, an aborted canary)."""
        self.groups.append(GroupPlan(g.revision, g.replica, g.track, in_rotation=False,
                                     draining=g.in_rotation))


def _layout(md: ModelDeployment, observed: Observed, now: float, *, stable: str, stable_track: str,
            stable_floor: int, stable_rotate: int | None = None,
            new: str | None = None, new_track: str = names.TRACK_CANARY, new_target: int = 0,
            new_rotate: int = 0, linger: Mapping[str, bool] | None = None) -> tuple[list[GroupPlan], bool]:
    """Groups for: `stable` serving with at least `stable_floor` groups in rotation (up to
    `replicas - new groups in rotation`), `new` at `new_target` groups of which up to `new_rotate`
    ready ones are in rotation, revisions in `linger` kept warm (True) while GPUs allow, every other
    revision removed. Returns the groups and whether something was blocked for lack of GPUs."""
    n = md.replicas
    budget = gpu_budget(md)
    layout = _Layout(md, observed, free=budget - gpus_in_use(md, observed), now=now,
                     held=held(restarts_now(md.status, observed, now), now))
    by_revision: dict[str, list[Group]] = {}
    stale: dict[str, list[Group]] = {}
    for g in observed.groups.values():
        if g.broken:
            continue   # removed below, whole; a new group is made in its place
        (stale if g.stale else by_revision).setdefault(g.revision, []).append(g)
    new_groups = _rank(by_revision.get(new, [])) if new and new != stable else []
    stable_groups = _rank(by_revision.get(stable, []))
    g_new, g_stable = group_gpus(md, observed, new), group_gpus(md, observed, stable)

    new_kept = new_groups[:new_target]
    new_in = min(sum(g.ready for g in new_kept), new_rotate)
    # Stable groups wanted in rotation: keep capacity (replicas - new groups in rotation), so stable
    # groups go as new ones become ready and the surge budget carries the progress. Only when the
    # budget cannot hold even one more new group (and none is loading) does one more stable group
    # make room ahead of time, never below the floor the current weight needs.
    want_stable = min(n, max(stable_floor, n - new_in)) if stable_rotate is None else stable_rotate
    if g_stable:
        want_stable = min(want_stable, max(stable_floor, (budget - len(new_kept) * g_new) // g_stable))
        missing = new_target - len(new_kept)
        loading = any(not g.ready for g in new_kept)
        room_for_one = (budget - (len(new_kept) + 1) * g_new) // g_stable
        if missing > 0 and not loading and want_stable > room_for_one:
            want_stable = max(stable_floor, room_for_one)
    stable_kept = stable_groups[:want_stable]

    # Stable first (capacity), then the new revision. A stable group whose pods do not run its
    # revision's template keeps serving only while its replacement loads (never below one ready
    # group in rotation), and gives way first when the budget has no room for the replacement.
    for g in stable_kept:
        layout.keep(g, stable_track, in_rotation=True)
    ready_kept = sum(g.ready for g in stable_kept)
    covering = [g for g in _rank(stale.get(stable, [])) if g.ready][:max(0, want_stable - ready_kept)]
    for g in covering:
        layout.keep(g, stable_track, in_rotation=True)
    used = [g.replica for g in observed.groups.values() if g.revision == stable]
    for replica in _free_indices(used, want_stable - len(stable_kept)):
        layout.create(stable, replica, stable_track)
    if layout.blocked and covering and ready_kept + len(covering) > 1:
        layout.groups = [p for p in layout.groups if (p.revision, p.replica) != (stable, covering[-1].replica)]
    rotating_new = 0
    for g in new_kept:
        rotate = g.ready and rotating_new < new_rotate
        rotating_new += rotate
        layout.keep(g, new_track, in_rotation=rotate)
    used_new = [g.replica for g in observed.groups.values() if g.revision == new]
    for replica in _free_indices(used_new, new_target - len(new_kept)):
        layout.create(new, replica, new_track)

    kept = {(p.revision, p.replica) for p in layout.groups}
    lingering = []
    for g in observed.groups.values():
        if (g.revision, g.replica) in kept:
            continue
        if (linger or {}).get(g.revision) and not g.stale and not g.broken:
            lingering.append(g)
        else:
            layout.remove(g)
    for g in lingering:
        # Warm groups give way as soon as something else needs their GPUs.
        if layout.blocked:
            layout.remove(g)
        else:
            layout.linger(g)
    # Draining groups are listed last, so the new in-rotation labels are written before old ones go.
    ordered = sorted(layout.groups, key=lambda p: (not p.in_rotation, p.draining))
    return ordered, layout.blocked
