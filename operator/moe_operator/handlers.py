"""kopf wiring only: every trigger becomes `controller.run(key)`; the controller lives in `memo`.

No timers or daemons (kopf would add a finalizer for them): the periodic resync is the CLI's own loop,
and owner references let the garbage collector remove pods and Services, so no finalizer is needed.
"""

from __future__ import annotations

import copy
import logging

import kopf

from . import names

registry = kopf.OperatorRegistry()
OWNED = {names.LABEL_MANAGED_BY: names.MANAGED_BY, names.LABEL_DEPLOYMENT: kopf.PRESENT}


def configure(settings: kopf.OperatorSettings) -> kopf.OperatorSettings:
    """kopf's bookkeeping under the project's prefix, in annotations, never in `.status`."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=names.PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{names.PREFIX}/finalizer"
    settings.posting.level = logging.WARNING      # Events for failures only; ours say what happened
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
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


@kopf.on.event("", "v1", "pods", labels=OWNED, registry=registry)
@kopf.on.event("", "v1", "services", labels=OWNED, registry=registry)
def reconcile_owner(namespace, labels, memo, **_):
    memo.controller.run((namespace, labels[names.LABEL_DEPLOYMENT]))
