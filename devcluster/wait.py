"""Waiting for something with a deadline, never a bare sleep: the devcluster's one poll loop.

`wait_until` says whether a condition came true in time; `poll` raises DevClusterError naming what
it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class DevClusterError(RuntimeError):
    """Something a user can act on: the message says what failed and where its log is."""


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    """Call check every `interval` seconds until it returns True (then True) or `timeout` seconds
    have passed (then False). check is called at least once, and once more after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def poll(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.1,
         on_timeout: Callable[[], str] | None = None) -> None:
    """Call check until it returns True; raise DevClusterError naming `what` after timeout seconds."""
    if not wait_until(check, timeout, interval):
        hint = on_timeout() if on_timeout else ""
        raise DevClusterError(f"timed out after {timeout:.0f}s waiting for {what}{hint}")
