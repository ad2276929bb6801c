"""Tenancy on the operator's side: the HTTPS port (`--tls-cert-file`/`--tls-private-key-file`, the
certificate re-read when its Secret is renewed, plain HTTP without them) and per-namespace /alerts
tokens (a tenant's token aborts rollouts in its own namespace only). The chart's admission policy and
roles are tests/cluster/test_tenancy.py."""

import asyncio
import base64
import copy
import http.client
import json
import ssl
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application
from cryptography import x509
from moe_operator.api.timestamps import iso
from moe_operator.app import cli
from moe_operator.app.alerts import MAX_TOKEN_NAMESPACES, NamespaceTokens, TokenSource, alerts_routes
from moe_operator.app.metrics import OperatorMetrics
from moe_operator.app.server import TLSFiles, build_app, serve
from moe_operator.rollout.requests import ANNOTATION_ABORT

from devcluster.cluster.certs import make_ca, sign
from devtools.harness import free_port

pytestmark = pytest.mark.unit


# --- flags ---------------------------------------------------------------------------------------

def parse(*argv: str):
    p = cli.parser()
    args = p.parse_args(["run", *argv])
    cli.check_args(p, args)
    return args


def test_tls_flags_come_as_a_pair_and_default_to_plain_http(capsys):
    args = parse()
    assert args.tls_cert_file is None and args.tls_private_key_file is None and cli.tls_files(args) is None
    args = parse("--tls-cert-file", "/c.pem", "--tls-private-key-file", "/k.pem")
    assert (args.tls_cert_file, args.tls_private_key_file) == ("/c.pem", "/k.pem")
    for half in (("--tls-cert-file", "/c.pem"), ("--tls-private-key-file", "/k.pem")):
        with pytest.raises(SystemExit) as exit_:
            parse(*half)
        assert exit_.value.code == 2
        assert "--tls-cert-file and --tls-private-key-file go together" in capsys.readouterr().err


def test_tls_files_that_do_not_load_stop_the_operator_with_the_reason(tmp_path):
    (tmp_path / "c.pem").write_text("not a certificate")
    (tmp_path / "k.pem").write_text("not a key")
    args = parse("--tls-cert-file", str(tmp_path / "c.pem"), "--tls-private-key-file", str(tmp_path / "k.pem"))
    with pytest.raises(SystemExit, match=r"cannot load the TLS certificate .*c\.pem and key .*k\.pem"):
        cli.tls_files(args)
    args = parse("--tls-cert-file", str(tmp_path / "none.pem"), "--tls-private-key-file", str(tmp_path / "k.pem"))
    with pytest.raises(SystemExit, match="No such file"):
        cli.tls_files(args)


def test_namespace_token_flag_names_the_secret_and_key(monkeypatch):
    assert cli.namespace_tokens(parse(), api=None) is None
    tokens = cli.namespace_tokens(parse("--alerts-namespace-token-secret", "moe-alerts-token"), api=None)
    assert (tokens.name, tokens.key) == ("moe-alerts-token", "token")
    tokens = cli.namespace_tokens(parse("--alerts-namespace-token-secret", "team-token:am"), api=None)
    assert (tokens.name, tokens.key) == ("team-token", "am")
    with pytest.raises(SystemExit, match="NAME"):
        cli.namespace_tokens(parse("--alerts-namespace-token-secret", ":key"), api=None)
    monkeypatch.setenv("MOE_OPERATOR_TLS_CERT_FILE", "/env/c.pem")
    monkeypatch.setenv("MOE_OPERATOR_TLS_PRIVATE_KEY_FILE", "/env/k.pem")
    args = parse()
    assert (args.tls_cert_file, args.tls_private_key_file) == ("/env/c.pem", "/env/k.pem")


# --- HTTPS ---------------------------------------------------------------------------------------

def write_pair(tmp_path, ca, common_name: str) -> None:
    cert, key = sign(*ca, common_name, dns_names=("moe-operator.moe-system.svc",), ip_addresses=("127.0.0.1",),
                     server=True)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)


async def served_common_name(port: int, ca_pem: bytes) -> str:
    """GET /metrics over HTTPS, the chain and the name checked against the CA; the certificate's CN."""
    context = ssl.create_default_context(cadata=ca_pem.decode())

    def get() -> bytes:
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            assert response.status == 200 and b"moe_operator_reconcile_total" in response.read()
            return connection.sock.getpeercert(binary_form=True)
        finally:
            connection.close()

    der = await asyncio.to_thread(get)
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


async def test_the_port_serves_https_with_the_given_certificate_and_picks_up_a_renewed_one(tmp_path):
    ca = make_ca()
    write_pair(tmp_path, ca, "first")
    tls = TLSFiles(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    port = free_port()
    runner = await serve(build_app(OperatorMetrics(), lambda: True), "127.0.0.1", port, tls.context)
    try:
        assert await served_common_name(port, ca[0]) == "CN=first"
        # plain HTTP is not spoken on an HTTPS port
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    await response.read()
        assert tls.reload_if_changed() is False              # nothing changed
        time.sleep(0.01)
        write_pair(tmp_path, ca, "renewed")                    # what the kubelet does with a renewed Secret
        assert tls.reload_if_changed() is True
        assert await served_common_name(port, ca[0]) == "CN=renewed"
        # a pair that does not match (a new certificate with the old key, or the reverse) keeps the one in use
        other_cert, other_key = sign(*ca, "other", server=True)
        (tmp_path / "tls.crt").write_bytes(other_cert)
        assert tls.reload_if_changed() is False
        assert await served_common_name(port, ca[0]) == "CN=renewed"
        (tmp_path / "tls.crt").write_bytes(sign(*ca, "renewed", ip_addresses=("127.0.0.1",), server=True)[0])
        (tmp_path / "tls.key").write_bytes(other_key)
        assert tls.reload_if_changed() is False
        assert await served_common_name(port, ca[0]) == "CN=renewed"
    finally:
        await runner.cleanup()


async def test_without_a_certificate_the_port_stays_plain_http():
    port = free_port()
    runner = await serve(build_app(OperatorMetrics(), lambda: True), "127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
    finally:
        await runner.cleanup()


# --- per-namespace tokens ------------------------------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class NotFound(Exception):
    status = 404


def test_namespace_tokens_are_read_per_namespace_and_cached():
    secrets = {("team-a", "moe-alerts-token"): {"token": b64("tok-a\n")}}
    reads = []
    clock = [0.0]

    def read(ns, name):
        reads.append(ns)
        if (ns, name) not in secrets:
            raise NotFound("secrets not found")
        return secrets[(ns, name)]

    tokens = NamespaceTokens("moe-alerts-token", "token", read, ttl=10, clock=lambda: clock[0])
    assert tokens.token("team-a") == "tok-a" and tokens.token("team-b") is None
    assert tokens.token("team-a") == "tok-a" and tokens.token("team-b") is None and reads == ["team-a", "team-b"]
    secrets[("team-a", "moe-alerts-token")] = {"token": b64("rotated")}
    clock[0] = 11
    assert tokens.token("team-a") == "rotated"                   # a rotated Secret counts after the ttl
    assert tokens.authorized("Bearer rotated", ["team-a", "team-b"]) == {"team-a"}
    assert tokens.authorized("Bearer tok-a", ["team-a"]) == set()
    assert tokens.authorized("Basic rotated", ["team-a"]) == set()
    assert tokens.authorized(None, ["team-a"]) == set()
    # invalid names are never looked up; one post makes at most MAX_TOKEN_NAMESPACES reads
    reads.clear()
    tokens.authorized("Bearer x", ["../secrets", "UPPER", *(f"ns-{i:02d}" for i in range(50))])
    assert len(reads) == MAX_TOKEN_NAMESPACES and all(r.startswith("ns-") for r in reads)


NOW = 1_800_000_100.0


def alert(namespace: str, name: str = "chat") -> dict:
    return {"status": "firing", "labels": {"alertname": "MoECanaryLatencyHigh", "namespace": namespace,
                                           "modeldeployment": name},
            "annotations": {"summary": "p99 latency 0.9s > 0.5s"}, "startsAt": iso(NOW - 30)}


def payload(*alerts) -> bytes:
    return json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)}).encode()


def md_body(namespace: str) -> dict:
    return {"metadata": {"name": "chat", "namespace": namespace, "annotations": {}},
            "spec": {"rollout": {"analysis": {}}},
            "status": {"stableRevision": "rev-a", "currentRevision": "rev-b",
                       "rollout": {"revision": "rev-b", "startedAt": iso(NOW - 60)}}}


class MemoryStore:
    def __init__(self, bodies):
        self.bodies, self.writes = bodies, []

    def get(self, namespace, name):
        body = self.bodies.get((namespace, name))
        return copy.deepcopy(body) if body else None

    def annotate(self, namespace, name, value):
        self.writes.append((namespace, name))
        self.bodies[(namespace, name)]["metadata"]["annotations"][ANNOTATION_ABORT] = value
        return copy.deepcopy(self.bodies[(namespace, name)])


@pytest.fixture
async def tenants_webhook():
    store = MemoryStore({(ns, "chat"): md_body(ns) for ns in ("team-a", "team-b")})
    secrets = {"team-a": {"token": b64("tok-a")}, "team-b": {"token": b64("tok-b")}}

    def read(ns, name):
        if name != "moe-alerts-token" or ns not in secrets:
            raise NotFound(ns)
        return secrets[ns]

    results = []
    app = Application()
    app.add_routes(alerts_routes(TokenSource(secret=("moe-system", "s", "token"),
                                             read_secret=lambda ns, n: {"token": b64("global")}),
                                 store, on_result=results.append, clock=lambda: NOW,
                                 namespace_tokens=NamespaceTokens("moe-alerts-token", "token", read)))
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client, store, results
    await client.close()


async def post(client, token: str | None, data: bytes):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = await client.post("/alerts", data=data, headers=headers)
    return response.status, (await response.json())


async def test_a_namespace_token_aborts_rollouts_in_its_own_namespace_only(tenants_webhook):
    client, store, results = tenants_webhook
    status, reply = await post(client, "tok-a", payload(alert("team-a"), alert("team-b")))
    assert status == 200
    assert [(e["namespace"], e["revision"]) for e in reply["aborted"]] == [("team-a", "rev-b")]
    assert reply["ignored"] == [{"namespace": "team-b", "modeldeployment": "chat", "alertname": "MoECanaryLatencyHigh",
                                 "why": "the bearer token is not namespace team-b's"}]
    assert store.writes == [("team-a", "chat")]
    # team-a's token with only team-b's alerts: not authorized at all, nothing read or written
    status, _ = await post(client, "tok-a", payload(alert("team-b")))
    assert status == 401 and store.writes == [("team-a", "chat")]
    # the global token still acts everywhere
    status, reply = await post(client, "global", payload(alert("team-b")))
    assert status == 200 and [e["namespace"] for e in reply["aborted"]] == ["team-b"]
    assert results == ["ok", "unauthorized", "ok"]


async def test_without_a_valid_token_nothing_is_said_about_the_payload(tenants_webhook):
    client, store, results = tenants_webhook
    for token, data in ((None, payload(alert("team-a"))), ("wrong", payload(alert("team-a"))),
                        ("wrong", b"{not json"), ("tok-a", b'{"alerts": 3}'), ("tok-a", payload(alert("team-c")))):
        status, reply = await post(client, token, data)
        assert status == 401 and reply == {"error": "missing or wrong bearer token"}, (token, data)
    assert store.writes == [] and results == ["unauthorized"] * 5
    # the global token still gets the payload's faults explained
    status, reply = await post(client, "global", b'{"alerts": 3}')
    assert status == 400 and "alerts must be a list" in reply["error"]


async def test_resolved_alerts_from_a_tenant_are_accepted_and_change_nothing(tenants_webhook):
    client, store, _ = tenants_webhook
    resolved = {**alert("team-a"), "status": "resolved"}
    status, reply = await post(client, "tok-a", payload(resolved))
    assert status == 200 and reply == {"aborted": [], "ignored": []} and store.writes == []

