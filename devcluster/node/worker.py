"""One pod on the local node, from its IP to the deletion of its object: directory, address,
service account and volumes first, then init containers (sidecars among them) in order, then the
main containers side by side; status writes as things change; graceful stop (preStop, SIGTERM,
the grace period, SIGKILL) and, for a deleted pod, the final status and the object's deletion."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time

import aiohttp

from devcluster.kubeapi import ApiError, rfc3339
from devcluster.node.containers import ContainerRunner, StartFailure, command_line
from devcluster.node.context import NodeContext
from devcluster.node.env import (
    ConfigError,
    ServiceAccountTokens,
    container_env,
    env_source_data,
    kubernetes_service_env,
    mount_env,
)
from devcluster.node.probes import run_handler
from devcluster.node.resolv import HOST_RESOLV_CONF, namespace_prefix, resolv_conf
from devcluster.node.status import pod_status
from devcluster.node.volumes import make_volumes

log = logging.getLogger("devcluster.node")

DEFAULT_GRACE_SECONDS = 30


class PodWorker:
    """Everything the node does for one pod, from its IP to the deletion of its object."""

    def __init__(self, node: NodeContext, pod: dict):
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.uid, self.name = meta["uid"], meta["name"]
        self.namespace = meta.get("namespace", "default")
        self.key = f"{self.namespace}/{self.name}"
        self.dir = node.config.pod_dir(self.namespace, self.name)
        spec = pod["spec"]
        self.has_init = bool(spec.get("initContainers"))
        policy = spec.get("restartPolicy", "Always")
        self.init_runners = [ContainerRunner(self, c, restart_policy=c.get("restartPolicy") or policy, init=True)
                             for c in spec.get("initContainers") or []]
        self.runners = [ContainerRunner(self, c, restart_policy=policy, init=False)
                        for c in spec.get("containers") or []]
        status = pod.get("status") or {}
        self._restore_restart_counts(status)
        self.pod_ip: str | None = None
        if spec.get("hostNetwork"):
            self.pod_ip = node.config.host_ip
        elif status.get("podIP") and node.ips.hold(status["podIP"], self.uid):
            self.pod_ip = status["podIP"]
        self.start_time = status.get("startTime") or rfc3339()
        self.init_done = not self.init_runners
        self.init_failed = False
        self.message = ""
        self.stopping = False
        self._stop = asyncio.Event()
        self._dirty = asyncio.Event()
        self._written: dict | None = None
        self._terminal_before = status.get("phase") in ("Succeeded", "Failed")
        self.sa_env: dict[str, str] = {}
        self.volume_dirs: dict[str, str] = {}
        self.launch_prefix: list[str] = []  # what starts a container process in the pod's mount namespace
        self._tasks: list[asyncio.Task] = []
        self._status_task: asyncio.Task | None = None
        self._stopped: asyncio.Future | None = None
        self._deleting = False

    def _restore_restart_counts(self, status: dict) -> None:
        previous = {s["name"]: s for s in (status.get("containerStatuses") or []) +
                    (status.get("initContainerStatuses") or [])}
        for runner in self.init_runners + self.runners:
            if runner.name in previous:
                runner.record.restart_count = int(previous[runner.name].get("restartCount") or 0)

    # -- state shared with the runners ---------------------------------------------------------

    def changed(self) -> None:
        self._dirty.set()

    async def wait_stopping(self, seconds: float) -> bool:
        """Waits up to `seconds`; True if the pod began stopping meanwhile."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self.stopping

    def grace_seconds(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds")
        return float(DEFAULT_GRACE_SECONDS if grace is None else grace)

    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp") and self._stopped is None and not self._deleting:
            self._deleting = True
            self._tasks.append(asyncio.create_task(self.stop(self.grace_seconds(), delete_object=True),
                                                   name=f"stop {self.key}"))

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs the pod until it is finished; stopping is `stop()`'s job."""
        self._status_task = asyncio.create_task(self._status_loop())
        self._tasks.append(self._status_task)
        self.changed()
        if self.pod["metadata"].get("deletionTimestamp"):
            self.update(self.pod)
            return
        if self._terminal_before:
            return  # finished before this agent (re)started: nothing to run, status stays
        if not await self._setup():
            return
        for runner in self.init_runners:
            if runner.sidecar:
                self._tasks.append(asyncio.create_task(runner.run()))
                while not runner.record.started and not self.stopping:
                    await self.wait_stopping(0.2)  # a bounded poll: sidecars count once started
                continue
            code = await runner.run()
            if code is None:
                return
            if code != 0:
                self.init_failed = True
                self.changed()
                await self._stop_sidecars()
                return
        self.init_done = True
        for runner in self.runners:
            runner.record.state = {"waiting": {"reason": "ContainerCreating"}}
        self.changed()
        await asyncio.gather(*(runner.run() for runner in self.runners))
        if not self.stopping:
            await self._stop_sidecars()

    async def _stop_sidecars(self) -> None:
        for runner in self.init_runners:
            runner.halted = True
        await asyncio.gather(*(r.terminate(self.grace_seconds()) for r in self.init_runners if r.sidecar))

    async def _setup(self) -> bool:
        """Pod directory, IP, service-account token and volumes; retried while the API says no."""
        delay = 1.0
        while not self.stopping:
            try:
                self._prepare_dir()
                if self.pod_ip is None:
                    self.pod_ip = self.node.ips.allocate(self.uid)
                    self.changed()
                config = self.node.config
                tokens = ServiceAccountTokens(self.node.client, self.pod)
                self.sa_env = await tokens.mount(self.dir / "serviceaccount", config.ca_file,
                                                 f"https://{config.api_host}:{config.api_port}")
                self.volume_dirs = await make_volumes(
                    self.pod, self.dir / "volumes", client=self.node.client, tokens=tokens,
                    pod_ip=self.pod_ip or "", host_ip=config.host_ip, allocatable=self.node.allocatable)
                self._write_resolv_conf()
                self.message = ""
                self.changed()
                if tokens.tokens:
                    self._tasks.append(asyncio.create_task(tokens.refresh(self.wait_stopping)))
                return True
            except (TimeoutError, ConfigError, ApiError, aiohttp.ClientError, OSError) as e:
                log.info("%s: not ready to start containers: %s", self.key, e)
                for runner in self.init_runners + self.runners:
                    runner.record.state = {"waiting": {"reason": "ContainerCreating", "message": str(e)}}
                self.changed()
                await self.wait_stopping(delay)
                delay = min(delay * 2, 10)
        return False

    def _write_resolv_conf(self) -> None:
        """The pod's resolv.conf, bound over /etc/resolv.conf in its processes' mount namespace; none
        where it is the machine's own file, or where this node cannot make mount namespaces."""
        config = self.node.config
        try:
            host_text = HOST_RESOLV_CONF.read_text()
        except OSError:
            host_text = ""
        text = resolv_conf(self.pod, config.cluster_dns, config.cluster_domain, host_text)
        if text is None or not self.node.mount_namespaces:
            self.launch_prefix = []
            return
        path = self.dir / "resolv.conf"
        path.write_text(text)
        self.launch_prefix = namespace_prefix(path)

    def _prepare_dir(self) -> None:
        marker = self.dir / ".uid"
        if self.dir.exists() and (not marker.exists() or marker.read_text() != self.uid):
            shutil.rmtree(self.dir, ignore_errors=True)  # an earlier pod of the same name
        self.dir.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.uid)

    async def container_command(self, container: dict) -> tuple[list[str], dict[str, str], str]:
        """argv, environment and working dir of one container start (ConfigError / StartFailure)."""
        command = list(container.get("command") or [])
        if not command:
            raise StartFailure(
                "CreateContainerError",
                "no command: the devcluster local node ignores images and runs the container's "
                "command and args as a local process; set spec.containers[].command")
        config = self.node.config
        sources = await env_source_data(self.node.client, self.namespace, container)
        # The container's hostname, as the runtime sets it: spec.hostname, else the pod's name.
        hostname = (self.pod.get("spec") or {}).get("hostname") or self.name
        base = {**self.node.base_env, "HOSTNAME": hostname,
                **kubernetes_service_env(config.api_host, config.api_port), **self.sa_env}
        env = container_env(self.pod, container, pod_ip=self.pod_ip or "", host_ip=config.host_ip,
                            base=base, sources=sources, node_allocatable=self.node.allocatable)
        env.update(mount_env(container, self.volume_dirs))
        env["DEVCLUSTER_POD_DIR"] = str(self.dir)
        cwd = container.get("workingDir") or str(self.dir)
        return command_line(command + list(container.get("args") or []), env, cwd), env, cwd

    async def stop(self, grace: float, delete_object: bool) -> None:
        """Stops every container (preStop, SIGTERM, `grace`, SIGKILL); with `delete_object`, writes
        the final status and deletes the pod object with grace 0, as the kubelet does."""
        if self._stopped is not None:
            await asyncio.shield(self._stopped)  # a second caller waits for the first one's work
            return
        self._stopped = asyncio.get_running_loop().create_future()
        try:
            await self._stop_containers(grace, delete_object)
        finally:
            self._stopped.set_result(None)

    async def _stop_containers(self, grace: float, delete_object: bool) -> None:
        self.stopping = True
        self._stop.set()
        deadline = time.monotonic() + max(grace, 0)
        runners = [r for r in self.runners + self.init_runners if r.process is not None]
        for runner in runners:
            runner._event("Normal", "Killing", f"Stopping container {runner.name}")
        await asyncio.gather(*(self._pre_stop(r, grace) for r in runners))
        remaining = max(deadline - time.monotonic(), 1.0 if grace > 0 else 0.0)
        # Main containers first, then sidecars (init containers with restartPolicy Always).
        await asyncio.gather(*(r.terminate(remaining) for r in self.runners))
        await asyncio.gather(*(r.terminate(max(deadline - time.monotonic(), 0.5)) for r in self.init_runners))
        for task in self._tasks:
            if task is not asyncio.current_task() and task is not self._status_task and not task.get_name(
                    ).startswith("stop"):
                task.cancel()
        self.node.ips.release(self.uid)
        if delete_object:
            await self._delete_object()
        for task in self._tasks:
            if task is not asyncio.current_task() and not task.get_name().startswith("stop"):
                task.cancel()
        if delete_object:
            self.remove_files()

    def remove_files(self) -> None:
        """Volumes and tokens go with the pod; its logs stay a while (see NodeAgent._collect_pod_dirs)."""
        shutil.rmtree(self.dir / "volumes", ignore_errors=True)
        shutil.rmtree(self.dir / "serviceaccount", ignore_errors=True)

    async def _delete_object(self) -> None:
        """Final status, then the pod object goes (grace 0, only this very pod: uid precondition)."""
        for attempt in range(5):
            try:
                with contextlib.suppress(ApiError):
                    await self._flush_status()
                await self.node.client.delete(
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}",
                    {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                     "preconditions": {"uid": self.uid}})
                return
            except ApiError as e:
                if e.status in (404, 409):
                    return
                log.warning("%s: deleting the pod object failed: %s", self.key, e)
            except (TimeoutError, aiohttp.ClientError) as e:
                log.warning("%s: deleting the pod object failed: %s", self.key, e)
            await asyncio.sleep(2 ** attempt)

    async def _pre_stop(self, runner: ContainerRunner, grace: float) -> None:
        handler = (runner.container.get("lifecycle") or {}).get("preStop")
        if not handler or grace <= 0:
            return
        ok, message = await run_handler(handler, pod_ip=self.pod_ip or "", container=runner.container,
                                        env=runner.env, cwd=runner.cwd, timeout=grace, http=self.node.http,
                                        prefix=self.launch_prefix)
        if not ok:
            log.info("%s/%s: preStop hook failed: %s", self.key, runner.name, message)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict:
        return pod_status(self.pod, init=[r.record for r in self.init_runners],
                          main=[r.record for r in self.runners], init_done=self.init_done,
                          init_failed=self.init_failed, pod_ip=self.pod_ip, host_ip=self.node.config.host_ip,
                          start_time=self.start_time, now=rfc3339(), message=self.message)

    async def _flush_status(self) -> bool:
        """Writes the status when it differs from what was last written; False if the pod is gone."""
        if self._terminal_before:
            return True
        status = self.status()
        if status == self._written:
            return True
        try:
            await self.node.client.patch(f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                                         {"metadata": {"uid": self.uid}, "status": status})
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        self._written = status
        return True

    async def _status_loop(self) -> None:
        delay = 1.0
        while True:
            await self._dirty.wait()
            await asyncio.sleep(0.05)  # let a burst of changes settle into one write
            self._dirty.clear()
            try:
                if not await self._flush_status():
                    return
                delay = 1.0
            except (TimeoutError, ApiError, aiohttp.ClientError) as e:
                if isinstance(e, ApiError) and e.status == 409:
                    return  # the uid precondition failed: the name now belongs to another pod
                log.warning("%s: status update failed (retrying in %.0fs): %s", self.key, delay, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                self._dirty.set()
