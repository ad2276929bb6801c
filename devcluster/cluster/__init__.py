"""The control plane on this machine: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
built from the Go module proxy (build.py, versions.py) and started with their certificates
(certs.py) and command lines (commands.py), kwok's simulated GPU nodes (kwok.py), Prometheus and
Alertmanager (monitoring.py, pod_discovery.py), and `DevCluster` (control_plane.py), which starts,
checks and stops them, recording what runs in state.json (state.py)."""
