"""The command lines of the control plane's own processes: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler (pure: binaries, paths and ports in, argv out). kwok's
and the monitoring's sit beside their configuration (kwok.py, monitoring.py)."""

from __future__ import annotations

from pathlib import Path

from devcluster.cluster.certs import Pki

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_CLUSTER_IP = "10.96.0.1"  # the `kubernetes` Service's ClusterIP (a SAN of the serving cert)

# Loopback pod IPs cannot be EndpointSlice addresses: the endpoint controllers only log errors
# here, and the service proxy computes endpoints itself. No node CIDRs are allocated (kwok and
# the local node hand out loopback pod IPs).
DISABLED_CONTROLLERS = ("endpoints-controller", "endpointslice-controller",
                        "endpointslice-mirroring-controller", "node-ipam-controller")
HEALTH_PATHS = "/healthz,/readyz,/livez,/metrics"
# Kubernetes' own gang scheduling (KEP-4671): the Workload/PodGroup API (scheduling.k8s.io/v1alpha2)
# and the scheduler's GangScheduling and topology-aware plugins, alpha and off by default in 1.36.
# The operator uses them where a cluster serves the API (docs/operator.md, "Replica groups").
FEATURE_GATES = "GenericWorkload=true,GangScheduling=true,TopologyAwareWorkloadScheduling=true"
RUNTIME_CONFIG = "scheduling.k8s.io/v1alpha2=true"


def etcd(binary: Path, data_dir: Path, client_port: int, peer_port: int) -> list[str]:
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    return [
        str(binary), "--name=devcluster", f"--data-dir={data_dir}",
        f"--listen-client-urls={client_url}", f"--advertise-client-urls={client_url}",
        f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
        f"--initial-cluster=devcluster={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
        "--quota-backend-bytes=2147483648",
    ]


def kube_apiserver(binary: Path, pki: Pki, *, port: int, etcd_port: int, cert_dir: Path) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={port}",
        f"--cert-dir={cert_dir}",
        f"--tls-cert-file={pki.apiserver_cert}", f"--tls-private-key-file={pki.apiserver_key}",
        f"--client-ca-file={pki.ca_cert}",
        "--authorization-mode=Node,RBAC",
        # OwnerReferencesPermissionEnforcement (on in OpenShift and other hardened clusters): setting
        # blockOwnerDeletion on an ownerReference needs `update` on the owner's finalizers.
        "--enable-admission-plugins=NodeRestriction,OwnerReferencesPermissionEnforcement",
        f"--service-account-issuer=https://127.0.0.1:{port}",
        f"--service-account-key-file={pki.sa_public}",
        f"--service-account-signing-key-file={pki.sa_private}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--endpoint-reconciler-type=none",
        "--allow-privileged=true",
        f"--kubelet-client-certificate={pki.client_cert('apiserver-kubelet-client')}",
        f"--kubelet-client-key={pki.client_key('apiserver-kubelet-client')}",
        "--kubelet-preferred-address-types=InternalIP,Hostname",
        "--profiling=false",
        "--event-ttl=30m",
        f"--feature-gates={FEATURE_GATES}",
        f"--runtime-config={RUNTIME_CONFIG}",
    ]


def _served_with_own_identity(port: int, kubeconfig: Path, cert_dir: Path) -> list[str]:
    """What kube-controller-manager and kube-scheduler share: loopback serving of their health, no
    leader election, their own kubeconfig for every API call."""
    return ["--bind-address=127.0.0.1", "--leader-elect=false",
            f"--authorization-always-allow-paths={HEALTH_PATHS}", f"--secure-port={port}",
            f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}", f"--cert-dir={cert_dir}"]


def kube_controller_manager(binary: Path, pki: Pki, *, port: int, kubeconfig: Path,
                            cert_dir: Path) -> list[str]:
    return [
        str(binary), *_served_with_own_identity(port, kubeconfig, cert_dir),
        "--controllers=*," + ",".join(f"-{c}" for c in DISABLED_CONTROLLERS),
        "--allocate-node-cidrs=false",
        # Each controller acts as its own ServiceAccount (system:controller:*), as in kubeadm;
        # the system:kube-controller-manager user alone may not touch nodes or configmaps.
        "--use-service-account-credentials=true",
        f"--root-ca-file={pki.ca_cert}",
        f"--service-account-private-key-file={pki.sa_private}",
        f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        f"--feature-gates={FEATURE_GATES}",
    ]


def kube_scheduler(binary: Path, *, port: int, kubeconfig: Path, cert_dir: Path) -> list[str]:
    return [str(binary), *_served_with_own_identity(port, kubeconfig, cert_dir), f"--feature-gates={FEATURE_GATES}"]
