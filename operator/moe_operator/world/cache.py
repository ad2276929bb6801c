"""Watch-fed caches of what the operator owns, so that a reconcile makes no API read.

One `KindCache` per kind (Pods, Services, ControllerRevisions, and PodGroups and PrometheusRules
where the cluster serves them) lists and then watches, with the server-side label selector
`app.kubernetes.io/managed-by=moe-operator`, every namespace the operator watches, and keeps the
objects by (namespace, ModelDeployment). A change calls `on_change((namespace, name))`, which
reconciles the owner: these watches are also the operator's triggers for its pods and Services.

A cache answers only once its first list is in (`synced`); until then, and after a watch breaks
until its relist is in, `Reader.observe` lists from the API as it always did. A watch that expires
(410 Gone) or fails is relisted. Reading a moment behind the API server is safe here: pod names are
deterministic, so a pod created by the previous pass and not yet seen is applied again as the same
object (a no-op), deletes carry the uid they were computed from, and relabels are idempotent.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..api import names

log = logging.getLogger("moe_operator.cache")

SELECTOR = f"{names.LABEL_MANAGED_BY}={names.MANAGED_BY}"
KOPF_DIFFBASE = f"{names.PREFIX}/last-handled-configuration"   # app/handlers.py
WATCH_TIMEOUT_SECONDS = 300
LIST_PAGE = 250
RETRY_SECONDS = 2.0

Key = tuple[str, str]   # (namespace, ModelDeployment name)


def lean(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what the operator never reads and that weighs most at scale: its
    managedFields (every field's owner, often as large as the object) and kopf's copy of the last
    handled spec. Caches and the controller keep objects this way."""
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(KOPF_DIFFBASE, None)
    return obj


def owner_of(obj: Mapping[str, Any]) -> Key | None:
    meta = obj.get("metadata") or {}
    name = (meta.get("labels") or {}).get(names.LABEL_DEPLOYMENT)
    return (meta.get("namespace", ""), name) if name else None


@dataclass(frozen=True)
class _Entry:
    """One cached object, kept as compact JSON (a pod as Python dicts weighs about 8x its JSON: at
    thousands of objects the difference is most of the operator's memory); decoded when read, which
    is also a fresh copy for the reader."""
    owner: Key | None
    packed: bytes
    marked: bool = False

    def decode(self) -> dict[str, Any]:
        return json.loads(self.packed)


def pack(obj: Mapping[str, Any]) -> bytes:
    """An object as compact JSON bytes (how caches and the controller keep objects)."""
    return json.dumps(obj, separators=(",", ":")).encode()


class KindCache:
    """One kind's owned objects, by owner, fed by list + watch in a thread per namespace scope."""

    def __init__(self, dynamic_client, resource, namespaces: Iterable[str] | None = None,
                 on_change: Callable[[Key], None] | None = None, selector: str | None = SELECTOR,
                 field_selector: str | None = None,
                 slim: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 mark: Callable[[Mapping[str, Any]], bool] | None = None):
        """`selector`/`field_selector`: the watch's server-side selectors (owned objects by default);
        `slim`: what to keep of each object (all but its managedFields by default: `lean`); `mark`:
        objects `marked()` returns without decoding the rest."""
        self.dyn, self.resource = dynamic_client, resource
        self.selector, self.field_selector, self.slim = selector, field_selector, slim or lean
        self.mark = mark
        self.kind = getattr(resource, "kind", str(resource))
        self.scopes: list[str | None] = list(namespaces) if namespaces else [None]   # None: all namespaces
        self.on_change = on_change
        self._lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], _Entry]] = {}   # scope -> (ns, name) -> entry
        self._owned: dict[Key, set[tuple[str, tuple[str, str]]]] = {}     # owner -> {(scope, key)}
        self._synced: dict[str | None, bool] = dict.fromkeys(self.scopes, False)
        self._stop = threading.Event()
        self.relists = 0

    @property
    def synced(self) -> bool:
        return all(self._synced.values())

    def items(self, namespace: str, deployment: str) -> list[dict[str, Any]] | None:
        """Copies of the owned objects of one ModelDeployment, or None while not synced."""
        with self._lock:
            if not self.synced:
                return None
            entries = [self._objects[scope][key] for scope, key in self._owned.get((namespace, deployment), ())]
        return [e.decode() for e in entries]

    def everything(self) -> list[dict[str, Any]] | None:
        """Copies of every object in the cache, or None while not synced."""
        with self._lock:
            if not self.synced:
                return None
            entries = [e for objects in self._objects.values() for e in objects.values()]
        return [e.decode() for e in entries]

    def marked(self) -> list[dict[str, Any]] | None:
        """Copies of the objects `mark` picked, or None while not synced."""
        with self._lock:
            if not self.synced:
                return None
            entries = [e for objects in self._objects.values() for e in objects.values() if e.marked]
        return [e.decode() for e in entries]

    def start(self) -> None:
        for scope in self.scopes:
            threading.Thread(target=self._run, args=(scope,), name=f"cache-{self.kind}-{scope or 'all'}",
                             daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    # -- list + watch ---------------------------------------------------------------------------

    def _run(self, scope: str | None) -> None:
        while not self._stop.is_set():
            try:
                version = self._list(scope)
                self._watch(scope, version)
            except Exception as error:   # the API server away, RBAC, a broken stream: relist
                log.warning("%s cache (%s): %s; relisting", self.kind, scope or "all namespaces", error)
            with self._lock:
                self._synced[scope] = False
            self._stop.wait(RETRY_SECONDS)

    def _entry(self, obj: dict[str, Any]) -> _Entry:
        kept = self.slim(obj)
        return _Entry(owner_of(kept), pack(kept), bool(self.mark and self.mark(kept)))

    def _put(self, scope: str, key: tuple[str, str], entry: _Entry | None) -> None:
        """Store (or with None remove) one entry and its owner index (callers hold the lock)."""
        objects = self._objects.setdefault(scope, {})
        old = objects.pop(key, None)
        if old is not None and old.owner is not None:
            owned = self._owned.get(old.owner)
            if owned is not None:
                owned.discard((scope, key))
                if not owned:
                    del self._owned[old.owner]
        if entry is not None:
            objects[key] = entry
            if entry.owner is not None:
                self._owned.setdefault(entry.owner, set()).add((scope, key))

    def _list(self, scope: str | None) -> str:
        """List in pages (`LIST_PAGE` objects each), packing each page before the next: a relist of
        thousands of pods (after a watch's resourceVersion is compacted away) never holds them all
        as Python objects at once."""
        fresh: dict[tuple[str, str], _Entry] = {}
        token, version = None, ""
        while True:
            page = self.dyn.get(self.resource, namespace=scope, limit=LIST_PAGE, _continue=token,
                                **self._selectors()).to_dict()
            fresh.update((_key(o), self._entry(o)) for o in page.get("items") or [])
            meta = page.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            token = meta.get("continue")
            del page
            if not token:
                break
        with self._lock:
            before = dict(self._objects.get(scope or "", {}))
            for key in before:
                self._put(scope or "", key, None)
            for key, entry in fresh.items():
                self._put(scope or "", key, entry)
            self._synced[scope] = True
            self.relists += 1
        changed = {e.owner for k, e in fresh.items() if before.get(k) != e}
        changed |= {e.owner for k, e in before.items() if k not in fresh}
        self._notify(changed)
        return version

    def _watch(self, scope: str | None, version: str) -> None:
        while not self._stop.is_set():
            # Bookmarks keep `version` recent, so the next watch after a timeout resumes instead of
            # finding its version compacted away (410) and relisting everything.
            stream = self.dyn.watch(self.resource, namespace=scope, resource_version=version,
                                    timeout=WATCH_TIMEOUT_SECONDS, allow_watch_bookmarks=True,
                                    **self._selectors())
            for event in stream:
                kind, obj = event.get("type"), event.get("raw_object") or {}
                if kind == "ERROR":
                    raise RuntimeError(f"watch error: {obj.get('message') or obj}")
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind == "BOOKMARK":
                    continue
                entry = None if kind == "DELETED" else self._entry(obj)
                with self._lock:
                    self._put(scope or "", _key(obj), entry)
                self._notify({owner_of(obj)})
                if self._stop.is_set():
                    return

    def _selectors(self) -> dict[str, str]:
        return {k: v for k, v in (("label_selector", self.selector), ("field_selector", self.field_selector)) if v}

    def _notify(self, owners: set[Key | None]) -> None:
        if self.on_change is None:
            return
        for owner in owners:
            if owner is not None:
                self.on_change(owner)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")
