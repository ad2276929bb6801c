"""The pods and Services the operator builds, and the revision hash."""

import pytest
from moe_operator.api import names
from moe_operator.api.spec import ModelDeployment
from moe_operator.desired.pods import PodSlot, desired_pod, pod_name, revision_of, startup_allowance_seconds
from moe_operator.desired.services import desired_service, pods_selector

pytestmark = pytest.mark.unit


def md_of(spec=None, name="chat-moe"):
    base = {"model": {"source": "builtin:tiny-deepseek-v3", "servedName": "chat", "dtype": "float32"}}
    return ModelDeployment.from_body({"metadata": {"name": name, "namespace": "ns", "uid": "u-1", "generation": 1},
                                      "spec": {**base, **(spec or {})}})


def pod_of(md, rank=0, replica=0, track="stable", in_rotation=True):
    rev = revision_of(md)
    return desired_pod(md, PodSlot(rev, replica, rank, track, in_rotation, pod_name(md.name, rev, replica, rank)))


def container(pod):
    (c,) = pod["spec"]["containers"]
    return c


def env(pod):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(pod)["env"]}


def test_labels_follow_the_contract():
    md = md_of({"topology": {"podsPerReplica": 2}})
    pod = pod_of(md, rank=1, replica=3, track="canary", in_rotation=False)
    assert pod["metadata"]["labels"] == {
        "serving.moe.dev/deployment": "chat-moe",
        "serving.moe.dev/revision": revision_of(md),
        "serving.moe.dev/track": "canary",
        "serving.moe.dev/replica": "3",
        "serving.moe.dev/rank": "1",
        "serving.moe.dev/in-rotation": "false",
        "app.kubernetes.io/name": "moe-model-server",
        "app.kubernetes.io/instance": "chat-moe",
        "app.kubernetes.io/managed-by": "moe-operator",
    }
    assert pod["metadata"]["name"] == f"chat-moe-{revision_of(md)}-3-1"
    (owner,) = pod["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "serving.moe.dev/v1alpha1", "kind": "ModelDeployment", "name": "chat-moe",
                     "uid": "u-1", "controller": True, "blockOwnerDeletion": True}


def test_runtime_command_and_env():
    md = md_of({"runtime": {"args": ["--max-num-seqs", "8"], "env": [{"name": "X", "value": "1"}]},
                "topology": {"podsPerReplica": 4}})
    pod = pod_of(md, rank=2)
    c = container(pod)
    assert c["command"] == ["moe-runtime"]
    assert c["args"] == ["serve", "--model", "builtin:tiny-deepseek-v3", "--served-model-name", "chat",
                         "--http-port", "8000", "--grpc-port", "8001", "--dtype", "float32",
                         "--drain-timeout", "55", "--max-num-seqs", "8"]
    e = env(pod)
    assert e["POD_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert e["POD_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert e["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert (e["MOE_RANK"], e["MOE_WORLD_SIZE"], e["X"]) == ("2", "4", "1")
    assert e["MOE_REVISION"] == pod["metadata"]["labels"]["serving.moe.dev/revision"]
    assert [p["containerPort"] for p in c["ports"]] == [8000, 8001]


def test_gpu_limits_and_requests():
    c = container(pod_of(md_of({"resources": {"gpus": 8, "cpu": 16, "memory": "200Gi"}})))
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "8", "memory": "200Gi"}
    assert c["resources"]["requests"] == {"nvidia.com/gpu": "8", "cpu": "16", "memory": "200Gi"}
    assert "resources" not in container(pod_of(md_of({"resources": {"gpus": 0}})))
    c = container(pod_of(md_of({"resources": {"gpus": 2, "gpuResource": "amd.com/gpu"}})))
    assert c["resources"]["limits"] == {"amd.com/gpu": "2"}


def test_probes_allow_for_model_loading():
    c = container(pod_of(md_of()))
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    big = md_of({"model": {"source": "pvc://weights/dsv3"}})
    assert startup_allowance_seconds(big) == 1200
    c = container(pod_of(md_of({"runtime": {"startupTimeoutSeconds": 3600}})))
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 3600


def test_restricted_security():
    pod = pod_of(md_of())
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container(pod)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert spec["terminationGracePeriodSeconds"] == 60


def test_volumes_per_source():
    pod = pod_of(md_of({"model": {"source": "pvc://weights/deepseek/v3"}}))
    assert pod["spec"]["volumes"] == [{"name": "model",
                                       "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}]
    assert container(pod)["volumeMounts"] == [{"name": "model", "mountPath": "/models", "readOnly": True}]
    assert container(pod)["args"][2] == "/models/deepseek/v3"

    pod = pod_of(md_of({"model": {"source": "hostpath:///data/mixtral"}}))
    assert pod["spec"]["volumes"][0]["hostPath"] == {"path": "/data/mixtral", "type": "Directory"}
    assert container(pod)["volumeMounts"][0]["readOnly"] is True
    assert container(pod)["args"][2] == "/data/mixtral"

    pod = pod_of(md_of({"model": {"source": "hf://deepseek-ai/DeepSeek-V3@abc123"}}))
    (init,) = pod["spec"]["initContainers"]
    assert init["command"][-3:] == ["deepseek-ai/DeepSeek-V3", "abc123", "/model-cache/deepseek-ai/DeepSeek-V3"]
    assert pod["spec"]["volumes"] == [{"name": "model-cache", "emptyDir": {}}]
    assert container(pod)["args"][2] == "/model-cache/deepseek-ai/DeepSeek-V3"
    assert init["securityContext"]["allowPrivilegeEscalation"] is False

    pod = pod_of(md_of())
    assert "volumes" not in pod["spec"] and "volumeMounts" not in container(pod)


def test_scheduling_from_spec():
    pod = pod_of(md_of({"scheduling": {"nodeSelector": {"devcluster.serving.moe.dev/local": "true"},
                                       "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}}))
    assert pod["spec"]["nodeSelector"] == {"devcluster.serving.moe.dev/local": "true"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert "nodeSelector" not in pod_of(md_of())["spec"]


def test_revision_changes_only_with_the_pod_template():
    base = revision_of(md_of())
    assert base == revision_of(md_of())
    assert len(base) == 10
    same = [{"replicas": 7}, {"rollout": {"strategy": "BlueGreen", "blueGreen": {}}},
            {"autoscaling": {"maxReplicas": 4}}, {"rollout": {"canary": {"steps": [{"setWeight": 5}]}}}]
    for spec in same:
        assert revision_of(md_of(spec)) == base, spec
    different = [{"model": {"source": "builtin:tiny-mixtral", "servedName": "chat", "dtype": "float32"}},
                 {"runtime": {"image": "other:1"}}, {"runtime": {"args": ["--max-num-seqs", "4"]}},
                 {"resources": {"gpus": 2}}, {"topology": {"podsPerReplica": 2}},
                 {"scheduling": {"nodeSelector": {"a": "b"}}}]
    revisions = {revision_of(md_of(spec)) for spec in different}
    assert base not in revisions and len(revisions) == len(different)


def test_services():
    md = md_of()
    traffic = desired_service(md)
    assert traffic["metadata"]["name"] == "chat-moe"
    assert traffic["spec"]["selector"] == {"serving.moe.dev/deployment": "chat-moe",
                                           "serving.moe.dev/in-rotation": "true", "serving.moe.dev/rank": "0"}
    assert [(p["name"], p["port"]) for p in traffic["spec"]["ports"]] == [("http", 8000), ("grpc", 8001)]
    for track in names.TRACKS:
        svc = desired_service(md, track)
        assert svc["metadata"]["name"] == f"chat-moe-{track}"
        assert svc["spec"]["selector"][names.LABEL_TRACK] == track
        assert names.LABEL_IN_ROTATION not in svc["spec"]["selector"]
    assert traffic["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert pods_selector(md) == "serving.moe.dev/deployment=chat-moe,serving.moe.dev/rank=0"
