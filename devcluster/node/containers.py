"""One container of a pod as a local process: its command line, starting it (its own session, its
log, dying with the agent), stopping it (SIGTERM to the process group, a grace period, SIGKILL), and
its life as the kubelet runs it: probes, exits, restarts with the crash-loop back-off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Protocol

from devcluster.kubeapi import rfc3339
from devcluster.node.context import BACKOFF_BASE_SECONDS, NodeContext
from devcluster.node.env import ConfigError, expand_vars, find_executable
from devcluster.node.logs import log_tail, open_for_run
from devcluster.node.probes import ProbeTracker, run_handler
from devcluster.node.status import ContainerRecord, terminated_state

log = logging.getLogger("devcluster.node")

BACKOFF_MAX_SECONDS = 300.0
# The kubelet forgets a container's back-off once it ran this long without crashing.
BACKOFF_RESET_SECONDS = 600.0


def crash_backoff(crashes: int, base: float = BACKOFF_BASE_SECONDS, cap: float = BACKOFF_MAX_SECONDS) -> float:
    """Delay before the next restart after `crashes` consecutive failed runs: the first restart is
    immediate, then base, 2*base, ... up to cap (the kubelet's schedule)."""
    if crashes <= 1:
        return 0.0
    return min(cap, base * 2 ** (crashes - 2))


def should_restart(policy: str, exit_code: int) -> bool:
    return policy == "Always" or (policy == "OnFailure" and exit_code != 0)


class StartFailure(Exception):
    """A container process could not be started: waiting `reason` with `message`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def command_line(words: list[str], env: dict[str, str], cwd: str) -> list[str]:
    """command + args with `$(VAR)` expanded and the executable resolved in the container's PATH
    (StartFailure when the working dir or the executable is missing)."""
    argv = [expand_vars(str(word), env) for word in words]
    if not os.path.isdir(cwd):
        raise StartFailure("RunContainerError", f"workingDir {cwd!r} does not exist on this machine")
    exe = find_executable(argv[0], env.get("PATH", ""), cwd)
    if exe is None:
        raise StartFailure("RunContainerError", f'exec: "{argv[0]}": executable file not found in $PATH')
    return [exe, *argv[1:]]


async def spawn(node: NodeContext, pod_key: str, log_path: Path, container_name: str, argv: list[str],
                env: dict[str, str], cwd: str, prefix: list[str] | None = None) -> asyncio.subprocess.Process:
    """Starts a container's process in a session of its own (behind `prefix`: the pod's mount
    namespace wrapper, resolv.py), output appended to its log, recorded in the node's process table."""
    with open_for_run(log_path, argv) as log_file:
        try:
            process = await asyncio.create_subprocess_exec(
                *node.setpriv_prefix, *(prefix or []), *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file,
                stderr=asyncio.subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
        except OSError as e:
            raise StartFailure("RunContainerError", f"cannot start {argv[0]!r}: {e.strerror or e}") from e
    node.processes.add(process.pid, pod_key, container_name)
    return process


def reap(node: NodeContext, process: asyncio.subprocess.Process) -> None:
    """After a container's main process ended: kill what is left of its group (as a runtime kills
    the whole container) and forget the pid."""
    with contextlib.suppress(OSError):
        os.killpg(process.pid, signal.SIGKILL)
    node.processes.remove(process.pid)


class RunnerPod(Protocol):
    """What a ContainerRunner uses of its pod (worker.PodWorker)."""

    node: NodeContext
    pod: dict
    uid: str
    name: str
    namespace: str
    key: str
    dir: Path
    pod_ip: str | None
    launch_prefix: list[str]
    has_init: bool
    stopping: bool

    def changed(self) -> None: ...

    async def wait_stopping(self, seconds: float) -> bool: ...

    def grace_seconds(self) -> float: ...

    async def container_command(self, container: dict) -> tuple[list[str], dict[str, str], str]: ...


class ContainerRunner:
    """Runs one container of a pod: start, probes, exit, restart with back-off, until the pod stops
    or the restart policy says it is finished. `record` is its status."""

    def __init__(self, worker: RunnerPod, container: dict, *, restart_policy: str, init: bool):
        self.worker, self.container = worker, container
        self.name = container["name"]
        self.restart_policy = restart_policy
        self.init = init
        self.record = ContainerRecord(name=self.name, image=container.get("image", ""),
                                      state={"waiting": {"reason": "PodInitializing" if init is False and
                                                         worker.has_init else "ContainerCreating"}})
        self.process: asyncio.subprocess.Process | None = None
        self.env: dict[str, str] = {}
        self.cwd = str(worker.dir)
        self.exit_code: int | None = None  # set once the container is finished for good
        self._kill_message = ""
        self.halted = False  # no more restarts (a sidecar whose pod's main containers are done)

    @property
    def sidecar(self) -> bool:
        return self.init and self.container.get("restartPolicy") == "Always"

    def _set(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.record, key, value)
        self.worker.changed()

    async def run(self) -> int | None:
        """Returns the final exit code, or None when the pod stopped first."""
        worker = self.worker
        crashes = 0  # consecutive failed runs: the back-off grows with them
        config_retries = 0
        while not worker.stopping and not self.halted:
            delay = crash_backoff(crashes, worker.node.config.backoff_base)
            if delay:
                self._show_backoff(delay)
                if await worker.wait_stopping(delay):
                    break
            try:
                argv, self.env, self.cwd = await worker.container_command(self.container)
                config_retries = 0
                started_at = time.time()
                log_path = worker.dir / f"{self.name}.log"
                self.process = await spawn(worker.node, worker.key, log_path, self.name, argv, self.env, self.cwd,
                                           worker.launch_prefix)
            except ConfigError as e:
                # The kubelet retries these on every sync; the pod stays Pending meanwhile.
                self._set(state={"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}})
                config_retries += 1
                await worker.wait_stopping(min(2.0 ** config_retries, 10.0))
                continue
            except StartFailure as e:
                crashes += 1
                if e.reason == "CreateContainerError":  # never created: no restart is counted
                    self._set(state={"waiting": {"reason": e.reason, "message": e.message}})
                    continue
                now = rfc3339()
                failed = {"exitCode": 128, "reason": "StartError", "message": e.message,
                          "startedAt": now, "finishedAt": now}
                self._event("Warning", "Failed", f"Error: {e.message}")
                if not should_restart(self._effective_policy(), 128):
                    self._set(state={"terminated": failed})
                    self.exit_code = 128
                    return 128
                self._set(state={"waiting": {"reason": e.reason, "message": e.message}},
                          last_state={"terminated": failed}, restart_count=self.record.restart_count + 1)
                continue
            if worker.stopping:  # the pod began stopping while this process started
                await self.terminate(0)
            container_id = f"devcluster://{self.process.pid}"
            self._kill_message = ""
            self._event("Normal", "Started", f"Started container {self.name}")
            self._set(state={"running": {"startedAt": rfc3339(started_at)}}, container_id=container_id,
                      started=False, ready=False)
            probes = asyncio.create_task(self._probe(self.process))
            returncode = await self.process.wait()
            probes.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probes
            reap(worker.node, self.process)
            self.process = None
            message = self._kill_message
            if (not message and returncode != 0
                    and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError"):
                message = log_tail(worker.dir / f"{self.name}.log")
            finished = terminated_state(returncode, rfc3339(started_at), rfc3339(), container_id, message)
            if time.time() - started_at > BACKOFF_RESET_SECONDS:
                crashes = 0
            crashes += 1
            if worker.stopping or self.halted:
                self._set(state={"terminated": finished}, ready=False, started=False)
                return None
            if not should_restart(self._effective_policy(), finished["exitCode"]):
                # A completed init container counts as ready, as the kubelet reports it.
                self._set(state={"terminated": finished}, started=False,
                          ready=self.init and finished["exitCode"] == 0)
                self.exit_code = finished["exitCode"]
                return self.exit_code
            self._set(state={"waiting": {"reason": "ContainerCreating"}}, last_state={"terminated": finished},
                      ready=False, started=False, restart_count=self.record.restart_count + 1)
        return None

    def _effective_policy(self) -> str:
        # Init containers run to completion: a failed one is retried unless the pod says Never.
        if self.init and not self.sidecar:
            return "Never" if self.restart_policy == "Never" else "OnFailure"
        return self.restart_policy

    def _event(self, kind: str, reason: str, message: str) -> None:
        self.worker.node.events.record(self.worker.pod, self.name, self.init, kind, reason, message)

    def _show_backoff(self, delay: float) -> None:
        """The waiting state during a back-off: CrashLoopBackOff, or the start error that caused it."""
        self._event("Warning", "BackOff", f"Back-off restarting failed container {self.name} in pod "
                                          f"{self.worker.name}_{self.worker.namespace}({self.worker.uid})")
        waiting = self.record.state.get("waiting") or {}
        backoff = (f"back-off {delay:g}s restarting failed container={self.name} "
                   f"pod={self.worker.name}_{self.worker.namespace}({self.worker.uid})")
        if waiting.get("reason") in ("RunContainerError", "CreateContainerError"):
            message = waiting.get("message", "").split("; back-off ")[0]
            self._set(state={"waiting": {"reason": waiting["reason"], "message": f"{message}; {backoff}"}})
        else:
            self._set(state={"waiting": {"reason": "CrashLoopBackOff", "message": backoff}},
                      ready=False, started=False)

    async def _probe(self, process: asyncio.subprocess.Process) -> None:
        """Startup probe first; then readiness and liveness side by side (the kubelet's order)."""
        startup = self.container.get("startupProbe")
        if startup:
            if not await self._probe_loop("startup", startup, process):
                return
        self._set(started=True)
        loops = []
        readiness = self.container.get("readinessProbe")
        if readiness:
            loops.append(self._probe_loop("readiness", readiness, process))
        else:
            self._set(ready=True)
        liveness = self.container.get("livenessProbe")
        if liveness:
            loops.append(self._probe_loop("liveness", liveness, process))
        if loops:
            await asyncio.gather(*loops)

    async def _probe_loop(self, kind: str, probe: dict, process: asyncio.subprocess.Process) -> bool:
        """Probes until a startup probe succeeds (True) or a startup/liveness probe fails (the process
        is killed; False). Readiness probes run until the process ends."""
        tracker = ProbeTracker.for_probe(probe, initial=(kind == "liveness"))
        period = max(1.0, float(probe.get("periodSeconds") or 10))
        timeout = max(1.0, float(probe.get("timeoutSeconds") or 1))
        await asyncio.sleep(float(probe.get("initialDelaySeconds") or 0))
        while process.returncode is None:
            ok, message = await run_handler(probe, pod_ip=self.worker.pod_ip or "", container=self.container,
                                            env=self.env, cwd=self.cwd, timeout=timeout,
                                            http=self.worker.node.http, prefix=self.worker.launch_prefix)
            changed = tracker.observe(ok)
            if not ok:
                log.debug("%s/%s: %s probe failed: %s", self.worker.key, self.name, kind, message)
                self._event("Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {message}")
            if kind == "readiness" and changed:
                self._set(ready=tracker.result)
            elif kind == "startup" and tracker.result:
                return True
            elif not tracker.result and kind in ("startup", "liveness") and tracker.failures >= tracker.failure_threshold:
                log.info("%s/%s: %s probe failed %d times (%s); restarting", self.worker.key, self.name,
                         kind, tracker.failures, message)
                self._kill_message = f"{kind.capitalize()} probe failed: {message}"
                grace = probe.get("terminationGracePeriodSeconds")
                await self.terminate(self.worker.grace_seconds() if grace is None else float(grace))
                return False
            await asyncio.sleep(period)
        return False

    async def terminate(self, grace: float) -> None:
        """SIGTERM to the process group, then SIGKILL once `grace` seconds have passed."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), max(0.0, grace))
        except TimeoutError:
            with contextlib.suppress(OSError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
