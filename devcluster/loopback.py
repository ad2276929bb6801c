"""Everything the devcluster serves and connects to is on 127.0.0.0/8: the checks and helpers that
keep it there."""

from __future__ import annotations

import ipaddress
import socket
import urllib.request

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip) in LOOPBACK
    except ValueError:
        return False


def free_port(preferred: int | None = None) -> int:
    """A TCP port free on 127.0.0.1: preferred if it is free, else one the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port on 127.0.0.1")


def urlopen(request, *, context=None, timeout: float = 10.0):
    """urllib's urlopen without proxies: every devcluster address is on loopback, and an
    HTTP(S)_PROXY in the environment must not send loopback requests elsewhere."""
    handlers = [urllib.request.ProxyHandler({})]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)
