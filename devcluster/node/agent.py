"""The devcluster's local node: an agent that runs the pods bound to one Node as local processes.

    python -m devcluster.node --kubeconfig K --node-name devcluster-local --state-dir D --gpus 4 \
        --pod-cidr 127.100.0.0/16 --api-host 127.0.0.1 --api-port P --ca-file CA

The agent itself: it registers the Node, keeps its status and Lease, runs a worker per pod bound
to it, serves container logs, and stops every pod process when it stops. What a pod sees is in
devcluster.node's docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import sys
import time
from pathlib import Path

import aiohttp

from devcluster import processes
from devcluster.dns import CLUSTER_DOMAIN
from devcluster.kubeapi import ApiClient, ApiError, ClusterAccess, Informer, rfc3339
from devcluster.node.context import BACKOFF_BASE_SECONDS, IpAllocator, NodeConfig, NodeContext, ProcessTable
from devcluster.node.env import base_environment
from devcluster.node.logs import LOG_ROTATE_BYTES, LogServer, rotate_log
from devcluster.node.resolv import mount_namespaces_work
from devcluster.node.status import EventRecorder, node_capacity, node_labels, node_status, renew_lease
from devcluster.node.worker import DEFAULT_GRACE_SECONDS, PodWorker

log = logging.getLogger("devcluster.node")

LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 30


class NodeAgent:
    """The node itself: registers the Node, keeps its status and Lease, runs a PodWorker for every
    pod bound to it, serves container logs, and stops every pod process when it stops."""

    def __init__(self, config: NodeConfig, client: ApiClient):
        self.config, self.client = config, client
        self.capacity = node_capacity(config.gpus, config.state_dir)
        setpriv = shutil.which("setpriv")
        self.node = NodeContext(
            config=config, client=client, ips=IpAllocator(config.pod_cidr),
            processes=ProcessTable(config.state_dir / "processes.json"), allocatable=self.capacity,
            base_env=base_environment(dict(os.environ), os.path.dirname(sys.executable)),
            # Pod processes die with the agent (SIGKILL on the parent's death) if setpriv is at hand.
            setpriv_prefix=[setpriv, "--pdeathsig", "KILL", "--"] if setpriv else [],
            events=EventRecorder(config.node_name))
        works, why = mount_namespaces_work(config.state_dir)
        self.node.mount_namespaces = works
        if config.cluster_dns and not works:
            log.warning("pods cannot get their own /etc/resolv.conf (no mount namespace: %s); they resolve "
                        "through this machine's, and cluster names (%s) do not resolve in them",
                        why, config.cluster_domain)
        elif config.cluster_dns:
            log.info("pods resolve through the cluster DNS at %s (%s)", config.cluster_dns, config.cluster_domain)
        self.workers: dict[str, PodWorker] = {}
        self._worker_tasks: dict[str, asyncio.Task] = {}
        self._stopping_tasks: set[asyncio.Task] = set()
        self.logs = LogServer(config, self.container_running)
        self.node_uid = ""
        self.kubelet_version = "v0.0.0-devcluster"
        self.ready_since = rfc3339()

    async def run(self, stop: asyncio.Event) -> None:
        self.node.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256, force_close=True))
        try:
            try:
                await self.logs.start()
            except (OSError, ssl.SSLError, ValueError) as e:
                log.warning("no kubelet log endpoint (kubectl logs will not work): %s", e)
            if not await self._register(stop):
                return
            informer = Informer(self.client, "/api/v1/pods", self._on_pod,
                                params={"fieldSelector": f"spec.nodeName={self.config.node_name}"},
                                name="pods")
            background = [asyncio.create_task(c) for c in
                          (self._lease_loop(), self._node_status_loop(), informer.run(),
                           self.node.events.run(self.client), self._collect_pod_dirs(informer))]
            await stop.wait()
            for task in background:
                task.cancel()
            await self.shutdown()
        finally:
            await self.logs.stop()
            await self.node.http.close()

    async def _register(self, stop: asyncio.Event) -> bool:
        delay = 0.5
        while not stop.is_set():
            try:
                version = await self.client.get("/version")
                self.kubelet_version = version.get("gitVersion", self.kubelet_version)
                node = {"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": self.config.node_name, "labels": node_labels(self.config.node_name)},
                        "spec": {"podCIDR": self.config.pod_cidr, "podCIDRs": [self.config.pod_cidr]}}
                try:
                    created = await self.client.post("/api/v1/nodes", node)
                except ApiError as e:
                    if e.status != 409:
                        raise
                    created = await self.client.patch(f"/api/v1/nodes/{self.config.node_name}",
                                                      {"metadata": {"labels": node["metadata"]["labels"]}})
                self.node_uid = created["metadata"]["uid"]
                await self._post_node_status()
                await self._renew_lease()
                log.info("node %s registered (%s CPUs, %s memory, %s GPUs)", self.config.node_name,
                         self.capacity["cpu"], self.capacity["memory"], self.config.gpus)
                return True
            except (TimeoutError, ApiError, aiohttp.ClientError, OSError) as e:
                log.info("waiting for the API server: %s", e)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 5)
        return False

    async def _post_node_status(self) -> None:
        status = node_status(self.config.node_name, self.config.host_ip, self.capacity, self.kubelet_version,
                             rfc3339(), self.ready_since, self.logs.port)
        await self.client.patch(f"/api/v1/nodes/{self.config.node_name}/status", {"status": status})

    async def _collect_pod_dirs(self, informer: Informer) -> None:
        """Every ten minutes: removes the directories (logs included) of pods gone for over an hour,
        so that test runs do not pile them up, and rotates logs over LOG_ROTATE_BYTES."""
        await informer.synced.wait()
        pods_dir = self.config.state_dir / "pods"
        while True:
            live = {pod["metadata"]["uid"] for pod in informer.objects.values()}
            with contextlib.suppress(OSError):
                for pod_dir in pods_dir.iterdir():
                    marker = pod_dir / ".uid"
                    with contextlib.suppress(OSError):
                        uid = marker.read_text() if marker.exists() else ""
                        if uid not in live and time.time() - pod_dir.stat().st_mtime > 3600:
                            shutil.rmtree(pod_dir, ignore_errors=True)
                            continue
                        for log_file in pod_dir.glob("*.log"):
                            if log_file.stat().st_size > LOG_ROTATE_BYTES:
                                rotate_log(log_file)
            await asyncio.sleep(600)

    async def _renew_lease(self) -> None:
        await renew_lease(self.client, self.config.node_name, self.node_uid)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            try:
                await self._renew_lease()
            except (TimeoutError, ApiError, aiohttp.ClientError) as e:
                log.warning("lease renewal failed: %s", e)

    async def _node_status_loop(self) -> None:
        while True:
            await asyncio.sleep(NODE_STATUS_SECONDS)
            try:
                await self._post_node_status()
            except ApiError as e:
                if e.status == 404:  # someone deleted the Node: register it again
                    await self._register(asyncio.Event())
                else:
                    log.warning("node status update failed: %s", e)
            except (TimeoutError, aiohttp.ClientError) as e:
                log.warning("node status update failed: %s", e)

    def _on_pod(self, kind: str, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if kind == "DELETED":
            if worker is not None:
                # The object is gone (force deletion): stop the processes, write nothing.
                self._forget(worker, worker.stop(min(worker.grace_seconds(), DEFAULT_GRACE_SECONDS),
                                                 delete_object=False))
            return
        if worker is None:
            worker = PodWorker(self.node, pod)
            self.workers[uid] = worker
            task = asyncio.create_task(self._run_worker(worker))
            self._worker_tasks[uid] = task
        else:
            worker.update(pod)

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            await worker.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: pod worker failed", worker.key)

    def _forget(self, worker: PodWorker, stopping) -> None:
        async def stop_and_forget():
            try:
                await stopping
                worker.remove_files()
            finally:
                self.workers.pop(worker.uid, None)
                task = self._worker_tasks.pop(worker.uid, None)
                if task is not None:
                    task.cancel()
        task = asyncio.create_task(stop_and_forget())
        self._stopping_tasks.add(task)
        task.add_done_callback(self._stopping_tasks.discard)

    def container_running(self, namespace: str, pod: str, container: str) -> bool:
        """Whether a container's process runs now (a `kubectl logs -f` follows it while it does)."""
        for worker in list(self.workers.values()):
            if worker.namespace == namespace and worker.name == pod:
                return any(r.name == container and r.process is not None
                           for r in worker.runners + worker.init_runners)
        return False

    async def shutdown(self) -> None:
        """Stops every pod process (bounded grace), leaving pod objects as they are."""
        workers = list(self.workers.values())
        log.info("stopping %d pods", len(workers))
        await asyncio.gather(*(w.stop(min(w.grace_seconds(), self.config.shutdown_grace), delete_object=False)
                               for w in workers), return_exceptions=True)
        for task in list(self._worker_tasks.values()) + list(self._stopping_tasks):
            task.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devcluster.node", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="devcluster-local")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--pod-cidr", default="127.100.0.0/16")
    parser.add_argument("--api-host", default="127.0.0.1")
    parser.add_argument("--api-port", type=int, default=None,
                        help="the API server's port (default: the kubeconfig server's port)")
    parser.add_argument("--ca-file", default=None,
                        help="the API server's CA certificate (default: the kubeconfig's)")
    parser.add_argument("--cluster-dns", default=None,
                        help="the cluster DNS server's address, written into each pod's resolv.conf "
                             "(default: none; pods use this machine's resolv.conf)")
    parser.add_argument("--cluster-domain", default=CLUSTER_DOMAIN)
    parser.add_argument("--backoff-base-seconds", type=float, default=BACKOFF_BASE_SECONDS,
                        help="first crash-loop back-off (doubles up to 300 s)")
    parser.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                        help="longest a pod gets to exit when the agent itself stops")
    parser.add_argument("--cleanup", action="store_true",
                        help="only kill the pod processes a previous run left behind, then exit")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    access = ClusterAccess.from_kubeconfig(args.kubeconfig, state_dir / "credentials")
    port = args.api_port or int(access.server.rsplit(":", 1)[1].split("/")[0])
    ca_file = args.ca_file or access.ca_file
    if not ca_file:
        raise SystemExit("--ca-file is needed: the kubeconfig names no certificate authority")
    config = NodeConfig(node_name=args.node_name, state_dir=state_dir, gpus=args.gpus, pod_cidr=args.pod_cidr,
                        api_host=args.api_host, api_port=port, ca_file=str(Path(ca_file).resolve()),
                        cluster_dns=args.cluster_dns, cluster_domain=args.cluster_domain,
                        backoff_base=args.backoff_base_seconds, shutdown_grace=args.shutdown_grace_seconds)
    agent_processes = ProcessTable(state_dir / "processes.json")
    agent_processes.kill_leftovers()
    stop = processes.stop_event()
    client = ApiClient(access, user_agent=f"devcluster-node/{args.node_name}")
    try:
        await NodeAgent(config, client).run(stop)
    finally:
        await client.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir = Path(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.cleanup:
        killed = ProcessTable(state_dir.resolve() / "processes.json").kill_leftovers()
        log.info("cleanup: %d recorded processes handled", killed)
        return 0
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
