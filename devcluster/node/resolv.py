"""A pod's /etc/resolv.conf as the kubelet writes it, and how a local pod process gets it: its own
mount namespace with the file bound over /etc/resolv.conf.

The kubelet's rules (pkg/kubelet/network/dns): `dnsPolicy: ClusterFirst` (the default) points at the
cluster DNS with the search path `<ns>.svc.<domain> svc.<domain> <domain>` and `options ndots:5`;
`Default` is the node's own resolv.conf; `None` only what `dnsConfig` says; a hostNetwork pod with
ClusterFirst gets the node's (only `ClusterFirstWithHostNet` gives it the cluster's); `dnsConfig`'s
nameservers, searches and options are added to any of them. Without a cluster DNS, ClusterFirst falls
back to the node's file, as the kubelet does.

Here a nameserver off 127.0.0.0/8 from `dnsConfig` is left out (nothing a pod does may leave the
machine), and the node's own search domains are not appended (the cluster DNS answers nothing
outside the cluster domain, so they could only add failed queries).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from devcluster.loopback import is_loopback

log = logging.getLogger("devcluster.node")

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
CLUSTER_OPTIONS = ("ndots:5",)
MAX_NAMESERVERS = 3  # glibc reads no more
MAX_SEARCHES = 32    # the kubelet's limit

# Inside the new namespace: bind the pod's file over /etc/resolv.conf, then become the container's
# command (same pid, so the process table, signals and the process group stay the container's).
_BIND_AND_EXEC = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'


def parse_resolv_conf(text: str) -> tuple[list[str], list[str], list[str]]:
    """(nameservers, searches, options) of a resolv.conf; the last search/domain line wins, as in glibc."""
    nameservers, searches, options = [], [], []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) > 1:
            nameservers.append(words[1])
        elif words[0] in ("search", "domain"):
            searches = words[1:]
        elif words[0] == "options":
            options.extend(words[1:])
    return nameservers, searches, options


def _merge_options(base: list[str], extra: list[dict]) -> list[str]:
    """Options by name, later ones replacing earlier ones (the kubelet's mergeDNSOptions)."""
    merged: dict[str, str] = {}
    for option in base:
        name, _, value = option.partition(":")
        merged[name] = option
    for option in extra:
        name = option.get("name")
        if name:
            merged[name] = f"{name}:{option['value']}" if option.get("value") is not None else name
    return list(merged.values())


def _unique(items) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def resolv_conf(pod: dict, cluster_dns: str | None, cluster_domain: str, host_text: str) -> str | None:
    """The pod's resolv.conf, or None where it is the node's own file unchanged (nothing to bind)."""
    spec = pod.get("spec") or {}
    namespace = (pod.get("metadata") or {}).get("namespace") or "default"
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    dns_config = spec.get("dnsConfig") or {}
    cluster = (policy == "ClusterFirstWithHostNet"
               or (policy == "ClusterFirst" and not spec.get("hostNetwork")))
    if cluster and cluster_dns:
        nameservers = [cluster_dns]
        searches = [f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain]
        options = list(CLUSTER_OPTIONS)
    elif policy == "None":
        nameservers, searches, options = [], [], []
    elif not dns_config:
        return None  # Default, hostNetwork, or no cluster DNS: the node's file as it is
    else:
        nameservers, searches, options = parse_resolv_conf(host_text)
    extra_servers = dns_config.get("nameservers") or []
    dropped = [s for s in extra_servers if not is_loopback(s)]
    if dropped:
        log.warning("%s/%s: dnsConfig nameservers %s left out: off loopback", namespace,
                    (pod.get("metadata") or {}).get("name"), ", ".join(dropped))
    nameservers = _unique(nameservers + [s for s in extra_servers if is_loopback(s)])[:MAX_NAMESERVERS]
    searches = _unique(searches + list(dns_config.get("searches") or []))[:MAX_SEARCHES]
    options = _merge_options(options, dns_config.get("options") or [])
    lines = [f"nameserver {s}" for s in nameservers]
    if searches:
        lines.append("search " + " ".join(searches))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def namespace_prefix(resolv_path: Path) -> list[str]:
    """The argv prefix that starts a command in a mount namespace of its own (mounts from the machine
    still propagate in; none of its own propagate out) with resolv_path over /etc/resolv.conf."""
    return [shutil.which("unshare") or "unshare", "--mount", "--propagation", "slave", "--",
            "/bin/sh", "-c", _BIND_AND_EXEC, str(resolv_path)]


def mount_namespaces_work(scratch_dir: Path) -> tuple[bool, str]:
    """Whether namespace_prefix works here (root, util-linux's unshare and mount, /etc/resolv.conf to
    cover), tried once with a file of its own: (works, why not)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False, "util-linux's unshare and mount are not on PATH"
    if not HOST_RESOLV_CONF.exists():
        return False, f"{HOST_RESOLV_CONF} does not exist"
    probe = scratch_dir / "resolv.conf.probe"
    scratch_dir.mkdir(parents=True, exist_ok=True)
    probe.write_text("nameserver 127.0.0.1\n# devcluster probe\n")
    try:
        result = subprocess.run([*namespace_prefix(probe), "cat", str(HOST_RESOLV_CONF)], capture_output=True,
                                text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    finally:
        probe.unlink(missing_ok=True)
    if result.returncode != 0 or "# devcluster probe" not in result.stdout:
        return False, (result.stderr.strip() or f"exit code {result.returncode}")
    return True, ""
