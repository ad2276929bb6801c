"""Simulated GPU nodes: kwok's configuration and the Node objects it manages.

kwok has no built-in behaviour: Stage objects say what happens to nodes and pods. The stages are
upstream's own for the pinned kwok version, copied out of its Go module by `build` (fast node
initialise, lease heartbeat, fast pod ready/complete/delete); `kwok_config` joins them into the
one `--config` file kwok reads.
"""

from __future__ import annotations

from pathlib import Path

import yaml

SIMULATED_LABEL = "devcluster.serving.moe.dev/simulated"
POD_CIDR = "127.200.0.0/16"
NODE_IP = "127.0.0.1"
NODE_LEASE_SECONDS = 40
GPU_RESOURCE = "nvidia.com/gpu"

# One simulated node: an 8 x H100 80GB server (as a DGX H100 / p5.48xlarge).
GPUS_PER_NODE = 8
NODE_CPU = "96"
NODE_MEMORY = "1Ti"
NODE_PODS = "110"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_MEMORY_MIB = "81559"


def node_name(index: int) -> str:
    return f"devcluster-gpu-{index}"


def simulated_node(index: int) -> dict:
    """The Node object of simulated GPU node `index` (kwok keeps its status and lease)."""
    name = node_name(index)
    resources = {"cpu": NODE_CPU, "memory": NODE_MEMORY, "pods": NODE_PODS, GPU_RESOURCE: str(GPUS_PER_NODE)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                SIMULATED_LABEL: "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node.kubernetes.io/instance-type": "sim.8xh100",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(GPUS_PER_NODE),
                "nvidia.com/gpu.memory": GPU_MEMORY_MIB,
                "type": "kwok",
            },
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def simulated_nodes(count: int) -> list[dict]:
    return [simulated_node(i) for i in range(count)]


def kwok_config(stages_dir: Path) -> str:
    """The multi-document YAML kwok reads with --config: upstream's stages, in a stable order."""
    documents = []
    for path in sorted(stages_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Stage":
                documents.append(doc)
    if not documents:
        raise RuntimeError(f"no kwok stages in {stages_dir}: run `python -m devcluster build` again")
    return yaml.safe_dump_all(documents, sort_keys=False)


def kwok_args(kubeconfig: Path, config: Path, server_port: int) -> list[str]:
    return [
        f"--kubeconfig={kubeconfig}",
        f"--config={config}",
        f"--manage-nodes-with-label-selector={SIMULATED_LABEL}=true",
        f"--cidr={POD_CIDR}",
        f"--node-ip={NODE_IP}",
        f"--node-lease-duration-seconds={NODE_LEASE_SECONDS}",
        f"--server-address=127.0.0.1:{server_port}",
    ]
