"""The local node agent end to end against an in-memory stand-in for the few API endpoints it
calls: real processes, probes, restarts and deletion, in seconds and without a cluster. The same
behaviour against the real API server: tests/cluster/test_local_node.py."""

import asyncio
import copy
import ipaddress
import json
import random
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from devcluster.node import ApiClient, ClusterAccess, NodeAgent, NodeConfig

pytestmark = pytest.mark.unit



def pod_cidr() -> str:
    """Not the devcluster's pod CIDR, and a different one per test, so that pods of a running
    devcluster or of a concurrent test run never share an address and port with these."""
    return f"127.{random.randint(150, 190)}.{random.randint(0, 255)}.0/24"


class FakeKube:
    def __init__(self):
        self.objects = {}  # path -> obj
        self.rv = 1
        self.watchers = []
        self.patches = []
        self.deleted = []
        self.tokens = 0

    def _bump(self, obj):
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def emit(self, kind, obj):
        for q in self.watchers:
            q.put_nowait({"type": kind, "object": copy.deepcopy(obj)})

    def add_pod(self, pod):
        pod.setdefault("metadata", {}).setdefault("namespace", "default")
        pod["metadata"]["uid"] = str(uuid.uuid4())
        pod["spec"].setdefault("nodeName", "devcluster-local")
        pod.setdefault("status", {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]})
        self._bump(pod)
        self.objects[f"pods/{pod['metadata']['namespace']}/{pod['metadata']['name']}"] = pod
        self.emit("ADDED", pod)
        return pod

    def pod(self, name, ns="default"):
        return self.objects.get(f"pods/{ns}/{name}")

    def mark_deleted(self, name, ns="default", grace=30):
        pod = self.pod(name, ns)
        pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        self._bump(pod)
        self.emit("MODIFIED", pod)

    def app(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request):
        path, method = request.path, request.method
        body = await request.json() if request.can_read_body else None
        if path == "/version":
            return web.json_response({"gitVersion": "v1.36.3-fake"})
        if path == "/api/v1/nodes" and method == "POST":
            if "nodes/x" in self.objects:
                return web.json_response({"message": "exists"}, status=409)
            body["metadata"]["uid"] = "node-uid"
            self.objects["nodes/x"] = body
            return web.json_response(body)
        if path.startswith("/api/v1/nodes/"):
            node = self.objects["nodes/x"]
            if path.endswith("/status"):
                node["status"] = body["status"]
            return web.json_response(node)
        if "/leases" in path:
            if method == "PATCH" and "lease" not in self.objects:
                return web.json_response({"message": "nf"}, status=404)
            self.objects["lease"] = body
            return web.json_response(body)
        if path == "/api/v1/pods":
            if request.query.get("watch"):
                q = asyncio.Queue()
                self.watchers.append(q)
                resp = web.StreamResponse()
                await resp.prepare(request)
                try:
                    while True:
                        event = await q.get()
                        await resp.write(json.dumps(event).encode() + b"\n")
                finally:
                    self.watchers.remove(q)
            items = [copy.deepcopy(o) for k, o in self.objects.items() if k.startswith("pods/")]
            return web.json_response({"items": items, "metadata": {"resourceVersion": str(self.rv)}})
        parts = path.strip("/").split("/")
        # /api/v1/namespaces/{ns}/{plural}/{name}[/sub]
        if len(parts) >= 6 and parts[2] == "namespaces":
            ns, plural, name = parts[3], parts[4], parts[5]
            sub = parts[6] if len(parts) > 6 else ""
            if plural == "pods":
                pod = self.pod(name, ns)
                if pod is None:
                    return web.json_response({"message": "not found"}, status=404)
                if sub == "status":
                    self.patches.append(copy.deepcopy(body["status"]))
                    pod["status"] = body["status"]
                    self._bump(pod)
                    self.emit("MODIFIED", pod)
                    return web.json_response(pod)
                if method == "DELETE":
                    del self.objects[f"pods/{ns}/{name}"]
                    self.deleted.append(name)
                    self._bump(pod)
                    self.emit("DELETED", pod)
                    return web.json_response(pod)
            if plural == "serviceaccounts":
                if sub == "token":
                    self.tokens += 1
                    return web.json_response({"status": {"token": f"tok-{self.tokens}",
                                                         "expirationTimestamp": "2099-01-01T00:00:00Z"}})
                return web.json_response({"metadata": {"name": name}})
            obj = self.objects.get(f"{plural}/{ns}/{name}")
            if obj is None:
                return web.json_response({"message": f"{plural} {name} not found"}, status=404)
            return web.json_response(obj)
        return web.json_response({"message": f"unhandled {method} {path}"}, status=404)


async def until(pred, timeout=15.0, what=""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Harness:
    """The fake API server and one node agent at a time, both in the test's event loop."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.fake = FakeKube()
        self.agent: NodeAgent | None = None

    async def start_server(self):
        self.server = web.AppRunner(self.fake.app(), shutdown_timeout=0.5)
        await self.server.setup()
        await web.TCPSite(self.server, "127.0.0.1", 0).start()
        port = self.server.addresses[0][1]
        ca = self.tmp / "ca.crt"
        ca.write_text("fake")
        self.config = NodeConfig(node_name="devcluster-local", state_dir=self.tmp / "node", gpus=4,
                                 pod_cidr=pod_cidr(), api_host="127.0.0.1", api_port=port, ca_file=str(ca),
                                 backoff_base=1.0)
        self.config.state_dir.mkdir()
        self.client = ApiClient(ClusterAccess(server=f"http://127.0.0.1:{port}", ssl_context=False))

    async def start_agent(self):
        self.agent = NodeAgent(self.config, self.client)
        self.stop = asyncio.Event()
        watchers = len(self.fake.watchers)
        self.task = asyncio.create_task(self.agent.run(self.stop))
        await until(lambda: "nodes/x" in self.fake.objects and len(self.fake.watchers) > watchers,
                    what="registration")

    async def stop_agent(self):
        """As on SIGTERM."""
        self.stop.set()
        await asyncio.wait_for(self.task, 30)

    async def close(self):
        if not self.task.done():
            await self.stop_agent()
        await self.client.close()
        await self.server.cleanup()


@pytest.fixture
async def harness(tmp_path):
    h = Harness(tmp_path)
    await h.start_server()
    await h.start_agent()
    yield h
    await h.close()


@pytest.fixture
def env(harness):
    return harness.fake, harness.agent, harness.tmp


def cstatus(fake, name):
    pod = fake.pod(name)
    statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
    return statuses[0] if statuses else {}


def cond(fake, name, ctype):
    pod = fake.pod(name) or {}
    for c in pod.get("status", {}).get("conditions") or []:
        if c["type"] == ctype:
            return c["status"]
    return None


async def test_http_server_pod_ready(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "web"}, "spec": {"containers": [{
        "name": "web", "command": ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}]}})
    await until(lambda: cond(fake, "web", "Ready") == "True", what="ready")
    ip = fake.pod("web")["status"]["podIP"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(agent.config.pod_cidr)
    async with aiohttp.ClientSession() as s, s.get(f"http://{ip}:8080/") as r:
        assert r.status == 200
    assert fake.pod("web")["status"]["phase"] == "Running"
    fake.mark_deleted("web", grace=5)
    await until(lambda: "web" in fake.deleted, what="deleted")


async def test_missing_command(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "nocmd"}, "spec": {"containers": [{"name": "c", "command": ["no-such-binary-xyz"]}]}})
    await until(lambda: cstatus(fake, "nocmd").get("state", {}).get("waiting", {}).get("reason") == "RunContainerError", what="reason")
    assert "executable file not found" in cstatus(fake, "nocmd")["state"]["waiting"]["message"]
    fake.add_pod({"metadata": {"name": "empty"}, "spec": {"containers": [{"name": "c", "image": "x"}]}})
    await until(lambda: cstatus(fake, "empty").get("state", {}).get("waiting", {}).get("reason") == "CreateContainerError", what="reason")


async def test_crashloop(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "crash"}, "spec": {"containers": [{"name": "c", "command": ["sh", "-c", "exit 3"]}]}})
    await until(lambda: cstatus(fake, "crash").get("state", {}).get("waiting", {}).get("reason") == "CrashLoopBackOff", what="crashloop")
    await until(lambda: cstatus(fake, "crash").get("restartCount", 0) >= 3, what="restarts")
    st = cstatus(fake, "crash")
    assert st["lastState"]["terminated"]["exitCode"] == 3


async def test_never_succeeded_and_init(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "job"}, "spec": {"restartPolicy": "Never",
        "initContainers": [{"name": "i", "command": ["sh", "-c", "echo init > $(DEVCLUSTER_POD_DIR)/i"]}],
        "containers": [{"name": "c", "command": ["sh", "-c", "cat $DEVCLUSTER_POD_DIR/i; echo $KUBECONFIG; test -f $KUBECONFIG"]}]}})
    await until(lambda: (fake.pod("job") or {}).get("status", {}).get("phase") == "Succeeded", what="succeeded")
    assert "init" in (tmp / "node/pods/default_job/c.log").read_text()
    fake.add_pod({"metadata": {"name": "jobf"}, "spec": {"restartPolicy": "Never",
        "containers": [{"name": "c", "command": ["false"]}]}})
    await until(lambda: (fake.pod("jobf") or {}).get("status", {}).get("phase") == "Failed", what="failed")


async def test_liveness_restart_and_sigterm(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "live"}, "spec": {"terminationGracePeriodSeconds": 3, "containers": [{
        "name": "c", "command": ["sleep", "100"],
        "livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2}}]}})
    await until(lambda: cstatus(fake, "live").get("restartCount", 0) >= 1, what="liveness restart")
    assert "Liveness probe failed" in cstatus(fake, "live")["lastState"]["terminated"]["message"]
    fake.mark_deleted("live", grace=3)
    t = time.monotonic()
    await until(lambda: "live" in fake.deleted, what="deleted")
    assert time.monotonic() - t < 2  # sleep dies on SIGTERM at once


async def test_many_pods(env):
    fake, agent, tmp = env
    for i in range(40):
        fake.add_pod({"metadata": {"name": f"p{i}"}, "spec": {"containers": [{"name": "c", "command": ["sleep", "60"]}]}})
    await until(lambda: all(cond(fake, f"p{i}", "Ready") == "True" for i in range(40)), timeout=40, what="40 ready")
    ips = {fake.pod(f"p{i}")["status"]["podIP"] for i in range(40)}
    assert len(ips) == 40
    for i in range(40):
        fake.mark_deleted(f"p{i}", grace=2)
    await until(lambda: len(fake.deleted) == 40, timeout=30, what="all deleted")
    assert not agent.processes.entries


async def test_sidecar(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "side"}, "spec": {"restartPolicy": "Never",
        "initContainers": [{"name": "proxy", "restartPolicy": "Always", "command": ["sleep", "100"]}],
        "containers": [{"name": "c", "command": ["sh", "-c", "sleep 1"]}]}})
    await until(lambda: (fake.pod("side") or {}).get("status", {}).get("phase") == "Succeeded", what="succeeded")
    await until(lambda: "terminated" in fake.pod("side")["status"]["initContainerStatuses"][0]["state"], what="sidecar stopped")


async def test_config_error_then_fixed(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "cfg"}, "spec": {"containers": [{"name": "c", "command": ["sleep", "100"],
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "x"}}}]}]}})
    await until(lambda: cstatus(fake, "cfg").get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError", what="config error")
    fake.objects["configmaps/default/cm"] = {"metadata": {"name": "cm"}, "data": {"x": "1"}}
    await until(lambda: "running" in cstatus(fake, "cfg").get("state", {}), what="running", timeout=10)


async def test_status_is_written_only_when_it_changes(env):
    fake, agent, tmp = env
    fake.add_pod({"metadata": {"name": "steady"}, "spec": {"containers": [{
        "name": "c", "command": ["sleep", "100"],
        "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}]}})
    await until(lambda: cond(fake, "steady", "Ready") == "True", what="ready")
    writes = len(fake.patches)
    await asyncio.sleep(2.5)  # two more probe periods, all successful: nothing to report
    assert len(fake.patches) == writes


async def test_a_restarted_agent_restarts_its_pods_on_their_ips(harness):
    fake = harness.fake
    fake.add_pod({"metadata": {"name": "keep"}, "spec": {"containers": [{"name": "c", "command": ["sleep", "100"]}]}})
    await until(lambda: cond(fake, "keep", "Ready") == "True", what="ready")
    ip = fake.pod("keep")["status"]["podIP"]
    (pid,) = [int(p) for p in harness.agent.processes.entries]
    await harness.stop_agent()
    assert fake.pod("keep") is not None  # the agent stops processes, never pod objects
    await until(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(),
                what="the pod's process to end")
    await harness.start_agent()
    await until(lambda: harness.agent.processes.entries and pid not in map(int, harness.agent.processes.entries),
                what="a new process")
    assert fake.pod("keep")["status"]["podIP"] == ip
