"""Detached processes the devcluster starts, recorded so that `down` stops exactly those.

A process is identified by its pid *and* its start time (field 22 of /proc/PID/stat), so a pid
the kernel has since reused for something else is never signalled.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from devcluster.wait import wait_until

MAX_LOG_BYTES = 50 * 1024 * 1024  # a longer log is moved to <log>.1 when its process next starts


@dataclass(frozen=True)
class ProcessRecord:
    """What `start` returns and the state file keeps."""

    name: str
    pid: int
    start_time: int  # clock ticks since boot, from /proc/PID/stat
    argv: list[str]
    log: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ProcessRecord:
        return cls(**data)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is parenthesised and may hold spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 overall; fields[0] is field 3


def is_alive(record: ProcessRecord) -> bool:
    """The recorded process still runs (not a zombie, not a reused pid)."""
    fields = _stat_fields(record.pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return int(fields[19]) == record.start_time


def start(name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> ProcessRecord:
    """Start argv in its own session, stdout and stderr appended to log_path (rotated once)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if log_path.exists() and log_path.stat().st_size > MAX_LOG_BYTES:
        os.replace(log_path, log_path.with_suffix(log_path.suffix + ".1"))
    with log_path.open("ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} starting {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True, close_fds=True)
    start_time = proc_start_time(proc.pid)
    if start_time is None:  # exited at once; the log says why
        proc.wait()
        raise RuntimeError(f"{name} exited at once (exit {proc.returncode}); see {log_path}")
    # Forget the Popen object without a ResourceWarning; the process outlives this one.
    proc.returncode = 0
    return ProcessRecord(name, proc.pid, start_time, list(argv), str(log_path))


def _reap(pid: int) -> None:
    """Collect a child's exit status so it is not left as a zombie (no-op for non-children)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _signal(record: ProcessRecord, sig: signal.Signals, group: bool) -> None:
    try:
        if group:
            os.killpg(record.pid, sig)
        else:
            os.kill(record.pid, sig)
    except (ProcessLookupError, PermissionError):  # gone, or no longer ours
        pass


def stop(records: list[ProcessRecord], timeout: float = 10.0, *, group: bool = False) -> list[str]:
    """SIGTERM each live record (with `group`, its whole process group), SIGKILL what is left after
    timeout. Returns the names killed."""
    live = [r for r in records if is_alive(r)]
    for record in live:
        _signal(record, signal.SIGTERM, group)

    def exited() -> bool:
        nonlocal live
        for record in live:
            _reap(record.pid)
        live = [r for r in live if is_alive(r)]
        return not live

    if wait_until(exited, timeout, interval=0.05):
        return []
    killed = list(live)
    for record in killed:
        _signal(record, signal.SIGKILL, group)
    wait_until(exited, 5, interval=0.05)
    return [r.name for r in killed]


def stop_event() -> asyncio.Event:
    """An event of the running loop that SIGTERM (what `down` sends) or SIGINT sets: how the
    devcluster's own agents (node, proxy) learn that they are to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def log_tail(path: str | Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
