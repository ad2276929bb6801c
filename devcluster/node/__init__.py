"""The devcluster's local node: an agent that runs the pods bound to one Node as local processes.

    python -m devcluster.node --kubeconfig K --node-name devcluster-local --state-dir D --gpus 4 \
        --pod-cidr 127.100.0.0/16 --api-host 127.0.0.1 --api-port P --ca-file CA

What a pod sees, compared with a real kubelet (docs/devcluster-node.md has the user's view):

- Network: every pod gets its own loopback address from ``--pod-cidr`` as ``status.podIP`` (Linux
  routes all of 127.0.0.0/8 to ``lo``), but pods share the machine's network stack: a process must
  bind to its pod IP (downward API ``status.podIP``), not 0.0.0.0, for two pods to use one port.
  ``hostNetwork`` pods get 127.0.0.1.
- DNS: with ``--cluster-dns`` (``up`` passes the devcluster's DNS server, devcluster/dns.py), each
  container process starts in a mount namespace of its own with the pod's resolv.conf, as the kubelet
  writes it (``search <ns>.svc.<domain> svc.<domain> <domain>``, ``options ndots:5``), bound over
  /etc/resolv.conf; ``dnsPolicy: Default`` and hostNetwork pods keep the machine's (resolv.py). This
  needs root; without it the agent warns and pods use the machine's file.
- Image: ignored. ``command`` + ``args`` run as a local process (``command`` is required; the first
  word is looked up in the container's ``PATH``, whose first entry is the directory of the Python
  running this agent, so the project's ``.venv`` console scripts resolve). The process starts in
  its own session/process group with a minimal environment (PATH, HOME, LANG and a few caches; never
  this agent's KUBECONFIG), plus env/envFrom as in Kubernetes (downward API fieldRef and
  resourceFieldRef, configMapKeyRef/secretKeyRef read from the API, ``$(VAR)`` expansion).
  ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and ``KUBERNETES_SERVICE_PORT=<api port>`` are injected;
  ``HOSTNAME`` is ``spec.hostname``, else the pod's name.
- Volumes: not mounted (the mount namespace only covers /etc/resolv.conf), so a container's volumeMounts become environment
  variables ``DEVCLUSTER_MOUNT_<PATH>=<host dir>`` where ``<PATH>`` is the mount path upper-cased with
  every run of other characters replaced by ``_`` (``/models`` -> ``DEVCLUSTER_MOUNT_MODELS``). emptyDir
  is a per-pod directory; hostPath is the host path itself; configMap, secret, downwardAPI and
  projected volumes are files written into a per-pod directory; a PVC bound to a hostPath/local PV
  maps to that path.
- Service account: the process cannot see ``/var/run/secrets/kubernetes.io/serviceaccount``. Unless
  ``automountServiceAccountToken`` is false (pod, else service account), the agent requests a bound
  token with the TokenRequest API and writes ``token``, ``ca.crt``, ``namespace`` and a ``kubeconfig``
  into ``<state-dir>/pods/<ns>_<name>/serviceaccount/``; ``KUBECONFIG`` points at that kubeconfig
  (also ``DEVCLUSTER_SERVICEACCOUNT_DIR``), and the token is refreshed before it expires. The
  projected ``kube-api-access-*`` volume the API server adds is written too (and exported as
  ``DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_KUBERNETES_IO_SERVICEACCOUNT``). RBAC therefore applies.
- Logs: ``<state-dir>/pods/<ns>_<name>/<container>.log`` (stdout and stderr, appended across
  restarts). The node serves the kubelet API's ``/containerLogs`` (HTTPS, clients need a cluster-CA
  certificate), so ``kubectl logs [-f] [--previous]`` works; ``exec`` and ``port-forward`` do not.
- Probes (startup, liveness, readiness; httpGet to the pod IP, tcpSocket, exec, grpc), restart
  policies with the kubelet's back-off (10 s doubling to 300 s, ``CrashLoopBackOff``), container
  statuses and pod phase/conditions, and graceful deletion (SIGTERM to the process group, the grace
  period, SIGKILL, then the pod object is deleted with grace 0) follow the kubelet.
- The agent keeps the Node's status and its Lease in ``kube-node-lease`` fresh. On SIGTERM it stops
  every pod process (SIGTERM, a bounded grace, SIGKILL) and exits without touching pod objects. On
  start it kills the processes a previous run recorded in ``<state-dir>/processes.json`` (checked
  against their start time) and restarts the pods it still owns with the pod IPs they had.
  ``--cleanup`` only does that kill and exits (for ``devcluster down``).

Modules, in the order a pod meets them:

    agent.py       the node: registration, Node status and Lease, one worker per pod, shutdown
    worker.py      one pod's lifecycle: set-up, init and main containers, status writes, stop, deletion
    env.py         a container's environment (downward API, ConfigMap/Secret keys, $(VAR)) and the
                   service account's token and kubeconfig (TokenRequest)
    volumes.py     the pod's volumes as directories and files on this machine
    resolv.py      the pod's resolv.conf (the kubelet's dnsPolicy rules) and its mount namespace
    containers.py  one container's process: start, restarts with back-off, SIGTERM with grace
    probes.py      probes and lifecycle handlers
    status.py      what the node reports: pod status, events, Node status, Lease
    logs.py        container logs and the /containerLogs endpoint
    context.py     what the workers share: settings, pod IPs, process table, API client, events
"""
