"""Back-off between re-creations of a revision's multi-pod groups (pure).

A group that lost a rank is deleted and made again whole (layout.py). A model that fails every time
it starts (a rank that runs out of memory once the weights load, a peer that cannot be reached)
would otherwise be re-created as fast as its pods can be scheduled, pulling images and loading
weights in a loop. As the kubelet does for a container (CrashLoopBackOff) and a Job for its pods:
the first re-creation is at once, each one after it waits twice as long (10 s, 20 s, ... up to 5
minutes), and the count starts over once a revision has gone 10 minutes past its last back-off
without losing a group.

The count is kept per revision in `status.groupRestarts` (so it survives an operator restart or a
failover): `[{"revision", "restarts", "lastRestartTime", "groups"}]`, `groups` being the replica
indices of the groups last counted. A broken group counts once: it is a new failure when its replica
index is not among those, or when its pods were created after the last restart on record (an index
used again); the group on record stays broken, and observed, until its pods are gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..api.timestamps import epoch, iso
from ..world.observe import Group, Observed

BACKOFF_FIRST_SECONDS = 10.0     # the second re-creation in a row waits this long, and each next twice as long
BACKOFF_MAX_SECONDS = 300.0
RESET_AFTER_SECONDS = 600.0      # a revision that loses no group for this long (after its back-off) starts over


@dataclass(frozen=True)
class Restarts:
    revision: str
    count: int                   # re-creations in a row
    last: float                  # when the last one was decided (epoch seconds, whole)
    groups: tuple[int, ...] = ()  # replica indices of the broken groups counted last

    @property
    def wait(self) -> float:
        """How long after `last` the group is made again: none for the first re-creation."""
        if self.count <= 1:
            return 0.0
        return min(BACKOFF_FIRST_SECONDS * 2 ** (self.count - 2), BACKOFF_MAX_SECONDS)

    @property
    def until(self) -> float:
        return self.last + self.wait

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "restarts": self.count, "lastRestartTime": iso(self.last),
                "groups": list(self.groups)}


def recorded(status: Mapping[str, Any]) -> dict[str, Restarts]:
    """`status.groupRestarts` as read back (entries it cannot read are dropped: the count starts over)."""
    out: dict[str, Restarts] = {}
    for item in status.get("groupRestarts") or ():
        if not isinstance(item, Mapping):
            continue
        revision, count, last = item.get("revision"), item.get("restarts"), epoch(item.get("lastRestartTime"))
        groups = item.get("groups") or []
        if isinstance(revision, str) and isinstance(count, int) and count > 0 and last is not None \
                and isinstance(groups, list) and all(isinstance(g, int) for g in groups):
            out[revision] = Restarts(revision, count, last, tuple(sorted(groups)))
    return out


def _created(group: Group) -> float | None:
    """When the group's newest pod was created (None if a pod does not say)."""
    times = [epoch(((p.body or {}).get("metadata") or {}).get("creationTimestamp")) for p in group.pods.values()]
    if not times or any(t is None for t in times):
        return None
    return max(times)


def restarts_now(status: Mapping[str, Any], observed: Observed, now: float) -> dict[str, Restarts]:
    """The back-off record after this observation: a revision with a newly broken group counts one
    more re-creation (decided now); records past their reset time are dropped."""
    now = float(int(now))          # whole seconds, as creationTimestamp
    out: dict[str, Restarts] = {}
    broken: dict[str, list[Group]] = {}
    for g in observed.groups.values():
        if g.broken:
            broken.setdefault(g.revision, []).append(g)
    for revision, record in recorded(status).items():
        if revision in broken or now < record.until + RESET_AFTER_SECONDS:
            out[revision] = record
    for revision, groups in broken.items():
        record = out.get(revision)
        replicas = tuple(sorted(g.replica for g in groups))
        if record is None:
            out[revision] = Restarts(revision, 1, now, replicas)
            continue
        if any(g.replica not in record.groups or (_created(g) or 0.0) > record.last for g in groups):
            out[revision] = Restarts(revision, record.count + 1, now, replicas)
    return out


def held(restarts: Mapping[str, Restarts], now: float) -> dict[str, float]:
    """Revisions whose groups may not be made yet: {revision: from when}."""
    return {r.revision: r.until for r in restarts.values() if now < r.until}


def to_status(restarts: Iterable[Restarts]) -> list[dict[str, Any]] | None:
    return [r.to_json() for r in sorted(restarts, key=lambda r: r.revision)] or None


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def backoff_note(restarts: Sequence[Restarts], now: float) -> str | None:
    """What status adds to a GroupRestarting message while a revision waits out its back-off."""
    waiting = [r for r in restarts if now < r.until]
    if not waiting:
        return None
    r = min(waiting, key=lambda r: r.until)
    return (f"the {ordinal(r.count)} re-creation in a row of revision {r.revision}'s groups "
            f"waits until {iso(r.until)}")
