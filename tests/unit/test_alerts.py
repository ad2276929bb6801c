"""The Alertmanager webhook: parsing, matching alerts to ModelDeployments, tokens, and the endpoint
(401 and 400 without any effect, repeats harmless, resolved alerts never resume, an alert about what
ran before the rollout does not abort it)."""

import base64
import copy
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application
from moe_operator.api.timestamps import iso
from moe_operator.app.alerts import (
    Alert,
    PayloadError,
    TokenSource,
    abort_request,
    alerts_routes,
    bearer_matches,
    parse_payload,
    targets,
)
from moe_operator.rollout.requests import ANNOTATION_ABORT, ANNOTATION_RETRY, AbortRequest

pytestmark = pytest.mark.unit

NOW = 1_800_000_100.0
STARTED = NOW - 60                  # when md_body's rollout began
AFTER_START = iso(NOW - 30)         # an alert that started firing during the rollout


def alert(status="firing", starts_at=AFTER_START, **labels):
    base = {"alertname": "MoECanaryLatencyHigh", "namespace": "ns", "modeldeployment": "chat"}
    return {"status": status, "labels": {**base, **labels},
            "annotations": {"summary": "p99 latency 0.9s > 0.5s"},
            "startsAt": starts_at, "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": "c6eadffa33fcdf37"}


def payload(*alerts, status="firing"):
    return json.dumps({"version": "4", "status": status, "receiver": "moe-operator", "groupKey": "{}:{}",
                       "truncatedAlerts": 0, "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {},
                       "externalURL": "http://127.0.0.1:9093", "alerts": list(alerts)}).encode()


def md_body(rolling="rev-b", stable="rev-a", **state):
    status = {"stableRevision": stable, "currentRevision": rolling}
    if rolling != stable:
        status["rollout"] = {"revision": rolling, "startedAt": iso(STARTED), **state}
    return {"metadata": {"name": "chat", "namespace": "ns", "annotations": {}},
            "spec": {"rollout": {"analysis": {}}}, "status": status}


# --- parsing -------------------------------------------------------------------------------------

def test_parse_alertmanager_payload():
    alerts = parse_payload(payload(alert(), alert("resolved")))
    assert [a.status for a in alerts] == ["firing", "resolved"]
    assert alerts[0].labels["modeldeployment"] == "chat"
    assert alerts[0].message == "MoECanaryLatencyHigh: p99 latency 0.9s > 0.5s"


@pytest.mark.parametrize("data,message", [
    (b"not json", "not JSON"),
    (b"[]", "JSON object"),
    (json.dumps({"version": "3", "alerts": []}).encode(), "version"),
    (json.dumps({"version": "4"}).encode(), "alerts must be a list"),
    (json.dumps({"alerts": ["x"]}).encode(), "alerts[0] must be an object"),
    (json.dumps({"alerts": [{"status": "pending", "labels": {}}]}).encode(), "status"),
    (json.dumps({"alerts": [{"status": "firing", "labels": {"a": 1}}]}).encode(), "labels"),
    (json.dumps({"alerts": [{"status": "firing", "labels": [], }]}).encode(), "labels"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_payloads_say_what_is_wrong(data, message):
    with pytest.raises(PayloadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_payload(data)


def test_only_firing_alerts_naming_an_object_are_targets():
    alerts = parse_payload(payload(
        alert(), alert("resolved"), alert(modeldeployment=""),
        {"status": "firing", "labels": {"alertname": "Other", "namespace": "ns"}},
        alert(revision="rev-b", track="canary")))
    found = targets(alerts)
    assert [(t.namespace, t.name, t.revision, t.track) for t in found] == [
        ("ns", "chat", None, None), ("ns", "chat", "rev-b", "canary")]


def promoted(body):
    body["status"]["stableRevision"] = body["status"]["currentRevision"]
    return body


# --- matching ------------------------------------------------------------------------------------

def target(starts_at=AFTER_START, **labels):
    return targets([Alert("firing", {"namespace": "ns", "modeldeployment": "chat", "alertname": "A", **labels},
                          starts_at=starts_at)])[0]


def test_abort_request_for_the_running_rollout():
    request, why = abort_request(target(), md_body(), NOW)
    assert why == "abort" and request.revision == "rev-b" and request.at == NOW
    assert request.source == "alert" and request.labels["alertname"] == "A"
    assert AbortRequest.from_json(request.to_json()) == request


@pytest.mark.parametrize("labels,body,why", [
    ({}, md_body(rolling="rev-a"), "no rollout"),
    ({"revision": "rev-x"}, md_body(), "names revision rev-x"),
    ({"track": "stable"}, md_body(), "stable track"),
    ({}, md_body(aborted={"reason": "AlertFiring"}), "already aborted"),
    ({}, promoted(md_body(completedAt=iso(NOW - 100), scaleDownAt=iso(NOW - 1), previousRevision="rev-a")),
     "no rollout"),
])
def test_alerts_that_do_not_abort(labels, body, why):
    request, reason = abort_request(target(**labels), body, NOW)
    assert request is None and why in reason


@pytest.mark.parametrize("labels,starts_at,aborts", [
    ({}, iso(STARTED - 3600), False),               # firing since before the rollout: about the old stable
    ({}, "", False),                                # no startsAt: nothing shows it is about the new revision
    ({}, iso(STARTED + 1), True),                   # started after the rollout began
    ({"revision": "rev-b"}, iso(STARTED - 3600), True),
    ({"track": "canary"}, iso(STARTED - 3600), True),
    ({"track": "preview"}, "", True),
])
def test_an_alert_aborts_only_a_rollout_it_is_about(labels, starts_at, aborts):
    request, why = abort_request(target(starts_at, **labels), md_body(), NOW)
    assert (request is not None) == aborts, why
    if not aborts:
        assert "names neither revision rev-b" in why and "canary or preview track" in why
        assert ("before the rollout began at " + iso(STARTED)) in why if starts_at else "no startsAt" in why


def test_an_old_alert_does_not_abort_again_after_a_retry():
    # The same alert, firing all along: the rollout it started during was aborted, then retried.
    body = md_body(startedAt=iso(NOW - 20), retriedAt=iso(NOW - 20))
    request, why = abort_request(target(iso(NOW - 30)), body, NOW)
    assert request is None and "before the rollout began at " + iso(NOW - 20) in why
    assert abort_request(target(iso(NOW - 10)), body, NOW)[0] is not None     # a new one does
    # A rollout status has not recorded yet (the spec just changed): only a targeted alert aborts.
    fresh = {**md_body(), "status": {"stableRevision": "rev-a", "currentRevision": "rev-b"}}
    request, why = abort_request(target(iso(NOW - 1)), fresh, NOW)
    assert request is None and "has not begun yet" in why
    assert abort_request(target(iso(NOW - 1), track="canary"), fresh, NOW)[0].revision == "rev-b"


def test_abort_allowed_while_the_old_revision_is_warm_after_a_switch():
    body = promoted(md_body(completedAt=iso(NOW - 5), scaleDownAt=iso(NOW + 25), previousRevision="rev-a"))
    request, _ = abort_request(target(), body, NOW)
    assert request.revision == "rev-b"


def test_disabled_alerts_do_nothing():
    body = md_body()
    body["spec"]["rollout"]["analysis"]["alerts"] = {"enabled": False}
    assert abort_request(target(), body, NOW)[0] is None


def test_repeats_keep_the_first_arrival_and_retry_allows_a_new_abort():
    body = md_body()
    first, _ = abort_request(target(), body, NOW)
    body["metadata"]["annotations"][ANNOTATION_ABORT] = first.to_json()
    again, why = abort_request(target(), body, NOW + 30)
    assert again is None and "already recorded" in why, "pending: the operator has not acted on it yet"
    # The operator acts on it (marks it handled, by id), then a retry starts the rollout afresh.
    body["status"]["rollout"]["handled"] = {"abort": first.key}
    body["metadata"]["annotations"][ANNOTATION_RETRY] = iso(NOW + 40)
    body["status"]["rollout"]["retriedAt"] = iso(NOW + 40)
    after_retry, _ = abort_request(target(revision="rev-b"), body, NOW + 50)
    assert after_retry.at == NOW + 50 and after_retry.id != first.id


# --- tokens --------------------------------------------------------------------------------------

def test_bearer_matches():
    assert bearer_matches("Bearer s3cret", "s3cret")
    assert bearer_matches("bearer s3cret ", "s3cret")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        assert not bearer_matches(header, "s3cret")
    assert not bearer_matches("Bearer ", "")
    assert not bearer_matches("Bearer x", None)


def test_token_from_file_and_secret(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert TokenSource(file=f).current() == "from-file"
    assert TokenSource(file=tmp_path / "missing").current() is None
    clock = [0.0]
    data = {"token": base64.b64encode(b"one").decode()}
    src = TokenSource(secret=("ns", "s", "token"), read_secret=lambda ns, name: data, ttl=10,
                      clock=lambda: clock[0])
    assert src.current() == "one"
    data["token"] = base64.b64encode(b"two").decode()
    assert src.current() == "one"            # cached
    clock[0] = 11
    assert src.current() == "two"            # rotated
    broken = TokenSource(secret=("ns", "s", "token"), read_secret=lambda ns, name: 1 / 0)
    assert broken.current() is None


# --- the endpoint --------------------------------------------------------------------------------

class MemoryStore:
    def __init__(self, bodies):
        self.bodies = bodies
        self.writes = []

    def get(self, namespace, name):
        body = self.bodies.get((namespace, name))
        return copy.deepcopy(body) if body else None

    def annotate(self, namespace, name, value):
        self.writes.append((namespace, name, value))
        self.bodies[(namespace, name)]["metadata"]["annotations"][ANNOTATION_ABORT] = value
        return copy.deepcopy(self.bodies[(namespace, name)])


@pytest.fixture
async def webhook():
    store = MemoryStore({("ns", "chat"): md_body()})
    aborted, results = [], []
    clock = [NOW]
    app = Application()
    app.add_routes(alerts_routes(TokenSource(file=None, secret=("ns", "s", "t"),
                                             read_secret=lambda ns, n: {"t": base64.b64encode(b"tok").decode()}),
                                 store, on_abort=lambda *a: aborted.append(a), on_result=results.append,
                                 clock=lambda: clock[0]))
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client, store, aborted, results, clock
    await client.close()


async def test_endpoint_refuses_bad_tokens_without_effect(webhook):
    client, store, aborted, results, _ = webhook
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic tok"}):
        response = await client.post("/alerts", data=payload(alert()), headers=headers)
        assert response.status == 401
    assert store.writes == [] and aborted == [] and results == ["unauthorized"] * 3


async def test_endpoint_refuses_malformed_payloads_without_effect(webhook):
    client, store, aborted, results, _ = webhook
    response = await client.post("/alerts", data=b'{"alerts": 3}', headers={"Authorization": "Bearer tok"})
    assert response.status == 400 and "alerts must be a list" in (await response.json())["error"]
    assert store.writes == [] and aborted == []


async def test_endpoint_records_one_abort_and_repeats_are_harmless(webhook):
    client, store, aborted, results, clock = webhook
    auth = {"Authorization": "Bearer tok"}
    response = await client.post("/alerts", data=payload(alert()), headers=auth)
    assert response.status == 200
    assert (await response.json())["aborted"] == [
        {"namespace": "ns", "modeldeployment": "chat", "alertname": "MoECanaryLatencyHigh", "revision": "rev-b"}]
    assert len(aborted) == 1 and aborted[0][1] == NOW and len(store.writes) == 1
    assert aborted[0][0]["metadata"]["annotations"][ANNOTATION_ABORT] == store.writes[0][2]
    request = AbortRequest.from_json(store.writes[0][2])
    assert request.reason == "AlertFiring" and request.at == NOW
    clock[0] += 60
    for status in ("firing", "resolved"):
        response = await client.post("/alerts", data=payload(alert(status), status=status), headers=auth)
        assert response.status == 200
    assert len(store.writes) == 1 and len(aborted) == 1
    # Unknown objects are ignored, with the reason in the reply.
    response = await client.post("/alerts", data=payload(alert(modeldeployment="ghost")), headers=auth)
    assert (await response.json())["ignored"][0]["why"] == "no such ModelDeployment"


async def test_endpoint_says_why_an_alert_from_before_the_rollout_does_not_abort(webhook):
    client, store, aborted, results, _ = webhook
    old = alert(starts_at=iso(STARTED - 3600), alertname="MoEStableLatencyHigh")
    response = await client.post("/alerts", data=payload(old), headers={"Authorization": "Bearer tok"})
    reply = await response.json()
    assert response.status == 200 and reply["aborted"] == [] and store.writes == [] and aborted == []
    assert reply["ignored"][0]["alertname"] == "MoEStableLatencyHigh"
    assert "before the rollout began" in reply["ignored"][0]["why"]


async def test_endpoint_answers_503_when_the_abort_cannot_be_written(webhook):
    client, store, aborted, results, _ = webhook

    def broken(*_):
        raise RuntimeError("API server unavailable")

    store.annotate = broken
    response = await client.post("/alerts", data=payload(alert()), headers={"Authorization": "Bearer tok"})
    assert response.status == 503 and aborted == [] and results == ["error"]
