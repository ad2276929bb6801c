"""kopf wiring only: every trigger becomes `controller.run(key)`; the controller lives in `memo`.

kopf watches the ModelDeployments. The pods, Services and other owned objects are watched by the
operator's own caches (world/cache.py: server-side label selectors, the same events reconcile
their owner), started by the CLI once this replica leads.

No timers or daemons (kopf would add a finalizer for them): the periodic resync is the CLI's own loop,
and owner references let the garbage collector remove pods and Services, so no finalizer is needed.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence

import kopf

from ..api import names
from .permissions import scans_namespaces

registry = kopf.OperatorRegistry()


class RetryForever:
    """kopf's delays between retries of an API error (5xx, 403, 429, a lost connection): 1, 1, 2, 3, 5, 8,
    then every 10 s, never giving up. kopf's default gives up after about a minute, and a watch that
    gives up stops the whole operator: a Role missing `list pods` would crash-loop the pod instead of
    reporting the permission on /healthz until someone grants it."""

    def __iter__(self):
        return itertools.chain((1, 1, 2, 3, 5, 8), itertools.repeat(10))


KOPF_WORKERS = 64      # per-object event workers at once (4 per handler thread)


def configure(settings: kopf.OperatorSettings, namespaces: Sequence[str] = ()) -> kopf.OperatorSettings:
    """kopf's bookkeeping under the project's prefix, in annotations, never in `.status`; with exact
    `namespaces` (no globs), no scanning: kopf then watches those namespaces without listing
    namespaces or CRDs cluster-wide, which a namespaced install has no permission for (kopf would
    retry the 403s for about a minute, reconciling nothing meanwhile)."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{names.PREFIX}/finalizer"
    settings.posting.level = logging.WARNING      # Events for failures only; ours say what happened
    settings.execution.max_workers = 16
    # kopf runs one worker per object with events (unbounded by default): a relist of thousands of
    # ModelDeployments (a watch whose resourceVersion was compacted away) then holds thousands of
    # bodies and their handler calls at once, waiting for the 16 threads above.
    settings.queueing.worker_limit = KOPF_WORKERS
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = RetryForever()
    settings.scanning.disabled = bool(namespaces) and not scans_namespaces(namespaces)
    return settings


@kopf.on.login(registry=registry)
def login(**kwargs):
    """In-cluster service account, else the kubeconfig (KUBECONFIG), as the operator's own client."""
    return kopf.login_via_client(**kwargs)


@kopf.on.event(names.GROUP, names.VERSION, names.PLURAL, registry=registry)
def remember_deployment(type, body, memo, **_):
    if type == "DELETED":
        memo.controller.forget((body["metadata"]["namespace"], body["metadata"]["name"]))
    else:
        memo.controller.remember(copy.deepcopy(dict(body)))


@kopf.on.resume(names.GROUP, names.VERSION, names.PLURAL, registry=registry)
@kopf.on.create(names.GROUP, names.VERSION, names.PLURAL, registry=registry)
@kopf.on.update(names.GROUP, names.VERSION, names.PLURAL, registry=registry)
def reconcile_deployment(body, memo, **_):
    memo.controller.remember(copy.deepcopy(dict(body)))
    memo.controller.run((body["metadata"]["namespace"], body["metadata"]["name"]))

