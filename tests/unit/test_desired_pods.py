"""The pods and Services the operator builds, and the revision hash."""

import dataclasses

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
        "serving.moe.dev/group": f"chat-moe-{revision_of(md)}-3",
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
                         "--drain-timeout", "55", "--tensor-parallel-size", "4", "--nnodes", "4",
                         "--node-rank", "2", "--master-addr", "$(MOE_LEADER_ADDRESS)",
                         "--master-port", "$(MOE_MASTER_PORT)", "--max-num-seqs", "8"]
    e = env(pod)
    assert e["POD_IP"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "status.podIP"}}
    assert e["POD_NAME"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert e["POD_NAMESPACE"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert (e["MOE_RANK"], e["MOE_WORLD_SIZE"], e["X"]) == ("2", "4", "1")
    assert e["MOE_REVISION"] == pod["metadata"]["labels"]["serving.moe.dev/revision"]
    assert [p["containerPort"] for p in c["ports"]] == [8000, 8001, int(e["MOE_MASTER_PORT"])]
    assert e["MOE_LEADER_ADDRESS"] == f"rank-0.chat-moe-{revision_of(md)}-0.ns"


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
    assert init["command"][-3:] == ["deepseek-ai/DeepSeek-V3", "abc123", "/model-cache/deepseek-ai/DeepSeek-V3@abc123"]
    assert pod["spec"]["volumes"] == [{"name": "model-cache", "emptyDir": {}}]
    assert container(pod)["args"][2] == "/model-cache/deepseek-ai/DeepSeek-V3@abc123"
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


def test_a_multi_pod_group_is_one_server_whose_ranks_meet_at_the_leaders_name():
    md = md_of({"resources": {"gpus": 8}, "topology": {"podsPerReplica": 2},
                "runtime": {"args": ["--enable-expert-parallel"]}})
    rev = revision_of(md)
    leader, follower = pod_of(md, rank=0, replica=1), pod_of(md, rank=1, replica=1)
    for rank, pod in enumerate((leader, follower)):
        spec, c, e = pod["spec"], container(pod), env(pod)
        assert spec["hostname"] == f"rank-{rank}" and spec["subdomain"] == f"chat-moe-{rev}-1"
        assert e["MOE_LEADER_ADDRESS"] == f"rank-0.chat-moe-{rev}-1.ns"
        args = c["args"]
        flag = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        assert flag["--tensor-parallel-size"] == "16" and flag["--nnodes"] == "2"
        assert flag["--node-rank"] == str(rank) and flag["--master-addr"] == "$(MOE_LEADER_ADDRESS)"
        assert args[-1] == "--enable-expert-parallel"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "dist", "containerPort": int(e["MOE_MASTER_PORT"]), "protocol": "TCP"} in c["ports"]
    # every group its own rendezvous port (groups may share a network stack), stable per group
    assert env(leader)["MOE_MASTER_PORT"] == env(follower)["MOE_MASTER_PORT"]
    assert env(pod_of(md, replica=2))["MOE_MASTER_PORT"] != env(leader)["MOE_MASTER_PORT"]


def test_a_single_pod_over_several_gpus_runs_one_rank_per_gpu_and_no_rendezvous():
    pod = pod_of(md_of({"resources": {"gpus": 4}}))
    args = container(pod)["args"]
    assert args[args.index("--tensor-parallel-size") + 1] == "4" and "--nnodes" not in args
    assert "hostname" not in pod["spec"] and "MOE_LEADER_ADDRESS" not in env(pod)
    one = pod_of(md_of({"resources": {"gpus": 1}}))
    assert "--tensor-parallel-size" not in container(one)["args"]
    assert "dshm" not in str(one["spec"].get("volumes"))


def test_the_group_service_is_headless_and_publishes_ranks_before_they_are_ready():
    from moe_operator.desired.services import desired_group_service

    md = md_of({"topology": {"podsPerReplica": 2}})
    rev = revision_of(md)
    svc = desired_group_service(md, rev, 1)
    assert svc["metadata"]["name"] == f"chat-moe-{rev}-1" == pod_of(md, replica=1)["spec"]["subdomain"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"serving.moe.dev/deployment": "chat-moe", "serving.moe.dev/revision": rev,
                                       "serving.moe.dev/replica": "1"}
    assert svc["spec"]["ports"][0]["port"] == int(env(pod_of(md, replica=1))["MOE_MASTER_PORT"])
    long = md_of({"topology": {"podsPerReplica": 2}}, name="m" * 55)
    name = desired_group_service(long, revision_of(long), 12)["metadata"]["name"]
    assert len(name) <= 63 and name.endswith(f"-{revision_of(long)}-12")


def test_placement_passes_through_and_group_domain_keeps_a_group_in_one_domain():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}}
    spread = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"serving.moe.dev/deployment": "chat-moe"}}}]
    md = md_of({"scheduling": {"affinity": affinity, "topologySpreadConstraints": spread},
                "topology": {"podsPerReplica": 2, "groupDomain": "nvidia.com/nvlink-domain"}})
    pod = pod_of(md, rank=1, replica=0)
    spec = pod["spec"]
    assert spec["affinity"]["nodeAffinity"] == affinity["nodeAffinity"]
    assert spec["topologySpreadConstraints"] == spread
    (same,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert same["topologyKey"] == "nvidia.com/nvlink-domain"
    assert same["labelSelector"]["matchLabels"] == {"serving.moe.dev/deployment": "chat-moe",
                                                    "serving.moe.dev/revision": revision_of(md),
                                                    "serving.moe.dev/replica": "0"}
    (other,) = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert {"key": "serving.moe.dev/group", "operator": "NotIn",
            "values": [pod["metadata"]["labels"]["serving.moe.dev/group"]]} in other["labelSelector"]["matchExpressions"]
    # placement is part of the template: changing it is a new revision; absent, hashes stay as they were
    assert revision_of(md) != revision_of(md_of({"topology": {"podsPerReplica": 2}}))
    with pytest.raises(Exception, match="groupDomain"):
        md_of({"topology": {"groupDomain": "not a label"}})


def test_a_group_that_lost_a_rank_is_recreated_whole_and_says_which_rank():
    from moe_operator.rollout.layout import _layout
    from moe_operator.status import status_of
    from moe_operator.world.observe import observed_from
    from moe_operator.world.plan import Plan

    md = md_of({"replicas": 1, "topology": {"podsPerReplica": 2}, "resources": {"gpus": 1}})
    rev = revision_of(md)

    def body(rank, ready=True, restarts=0, started=None):
        pod = pod_of(md, rank=rank)
        pod["status"] = {"phase": "Running", "podIP": f"127.0.0.{rank + 2}",
                         "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                         "containerStatuses": [{"name": "runtime", "ready": ready, "restartCount": restarts,
                                                "started": ready if started is None else started,
                                                **({"lastState": {"terminated": {"exitCode": 3}}} if restarts else {})}]}
        return pod

    healthy = observed_from([body(0), body(1)], [], 2)
    assert healthy.groups[(rev, 0)].broken is None
    groups, _ = _layout(md, healthy, 0.0, stable=rev, stable_track="stable", stable_floor=1)
    assert [(g.replica, g.in_rotation) for g in groups] == [(0, True)]

    # rank 0's runtime exited when rank 1 went away, and was restarted in place: the group cannot
    # serve; it leaves rotation at once and a new group (another replica index) is made
    restarted = observed_from([body(0, ready=False, restarts=1), body(1)], [], 2)
    assert restarted.groups[(rev, 0)].broken == (0, f"pod {body(0)['metadata']['name']} restarted "
                                                    "(container runtime exited with code 3)")
    groups, _ = _layout(md, restarted, 0.0, stable=rev, stable_track="stable", stable_floor=1)
    planned = {(g.replica, g.in_rotation, g.draining) for g in groups}
    assert (0, False, True) in planned and (1, False, False) in planned
    status = status_of(md, restarted, Plan(rev, rev, tuple(groups)), "2026-01-01T00:00:00Z")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "GroupRestarting" and "lost rank 0" in degraded["message"]

    lost = observed_from([body(0)], [], 2)   # rank 1's pod is gone while rank 0 is ready
    assert lost.groups[(rev, 0)].broken == (1, "its pod is gone")
    # rank 0 then goes unready (it lost its peer): still broken, nothing of the group is made again
    unready = observed_from([body(0, ready=False, started=True)], [], 2)
    assert unready.groups[(rev, 0)].broken == (1, "its pod is gone")
    # and exits and restarts: the status still names rank 1
    said = status_of(md, lost, Plan(rev, rev, ()), "2026-01-01T00:00:00Z")
    seen = dataclasses.replace(md, status=said)
    after = status_of(seen, observed_from([body(0, ready=False, restarts=1)], [], 2), Plan(rev, rev, ()),
                      "2026-01-01T00:00:01Z")
    assert [c["message"] for c in after["conditions"] if c["type"] == "Degraded"] == [
        f"replica group 0 of revision {rev} lost rank 1 (its pod is gone): re-creating the whole group"]
    starting = observed_from([body(0, ready=False)], [], 2)   # a group being made is not broken
    assert starting.groups[(rev, 0)].broken is None


def test_where_the_cluster_gang_schedules_each_group_gets_a_pod_group_its_pods_name():
    from moe_operator.desired.diff import changes, desired_objects, with_templates
    from moe_operator.world.observe import Observed
    from moe_operator.world.plan import GroupPlan, Plan

    md = md_of({"replicas": 2, "topology": {"podsPerReplica": 2, "groupDomain": "rack"}})
    rev = revision_of(md)
    plan = Plan(rev, rev, (GroupPlan(rev, 0, "stable", False), GroupPlan(rev, 1, "stable", False)))
    gang = desired_objects(md, plan, with_templates(Observed(pod_groups={}), {rev: md}))
    groups = [o for o in gang if o["kind"] == "PodGroup"]
    assert [g["metadata"]["name"] for g in groups] == [f"chat-moe-{rev}-0", f"chat-moe-{rev}-1"]
    assert groups[0]["apiVersion"] == "scheduling.k8s.io/v1alpha2"
    assert groups[0]["spec"] == {"schedulingPolicy": {"gang": {"minCount": 2}},
                                 "schedulingConstraints": {"topology": [{"key": "rack"}]}}
    pods = [o for o in gang if o["kind"] == "Pod"]
    assert len(pods) == 4
    assert {p["spec"]["schedulingGroup"]["podGroupName"] for p in pods} == {g["metadata"]["name"] for g in groups}
    # a stale PodGroup (its group gone) is deleted; one that is there is never rewritten (immutable)
    there = {groups[0]["metadata"]["name"]: {**groups[0], "metadata": {**groups[0]["metadata"], "uid": "1"}},
             "chat-moe-gone-0": {"metadata": {"name": "chat-moe-gone-0", "uid": "2"}}}
    todo = changes(gang, with_templates(Observed(pod_groups=there), {rev: md}))
    assert ("PodGroup", "chat-moe-gone-0", "2") in todo.delete
    assert [o["metadata"]["name"] for o in todo.apply if o["kind"] == "PodGroup"] == [f"chat-moe-{rev}-1"]
    # without the API: no PodGroup, no scheduling group
    plain = desired_objects(md, plan, with_templates(Observed(), {rev: md}))
    assert not [o for o in plain if o["kind"] == "PodGroup"]
    assert not [o for o in plain if o["kind"] == "Pod" and "schedulingGroup" in o["spec"]]
    assert not [o for o in plain if o["kind"] == "Pod" and "schedulingGates" in o["spec"]]
    # without the API, with the operator's own gang admission: every pod of a group behind the gate
    gated = desired_objects(md, plan, with_templates(Observed(gates=True), {rev: md}))
    assert [o["spec"]["schedulingGates"] for o in gated if o["kind"] == "Pod"] == [[{"name": names.GANG_GATE}]] * 4
    assert not [o for o in gated if o["kind"] == "PodGroup"]
    single = md_of({"replicas": 1})
    one = desired_objects(single, Plan(revision_of(single), revision_of(single),
                                       (GroupPlan(revision_of(single), 0, "stable", False),)),
                          with_templates(Observed(gates=True), {revision_of(single): single}))
    assert not [o for o in one if o["kind"] == "Pod" and "schedulingGates" in o["spec"]]   # one pod: nothing to gang


def test_hf_models_download_once_into_the_model_cache_claim():
    plain = pod_of(md_of({"model": {"source": "hf://deepseek-ai/DeepSeek-V3@abc", "servedName": "ds"}}))
    (init,) = plain["spec"]["initContainers"]
    assert init["command"] == ["python", "-m", "model_runtime.fetch", "deepseek-ai/DeepSeek-V3", "abc",
                               "/model-cache/deepseek-ai/DeepSeek-V3@abc"]
    assert plain["spec"]["volumes"] == [{"name": "model-cache", "emptyDir": {}}]
    spec = {"model": {"source": "hf://deepseek-ai/DeepSeek-V3", "servedName": "ds", "cache": {"claimName": "models"}}}
    cached = pod_of(md_of(spec))
    assert cached["spec"]["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "models"}}]
    c = container(cached)
    assert c["args"][c["args"].index("--model") + 1] == "/model-cache/deepseek-ai/DeepSeek-V3@main"
    assert {"name": "model-cache", "mountPath": "/model-cache", "readOnly": True} in c["volumeMounts"]
    assert revision_of(md_of(spec)) != revision_of(md_of({"model": {**spec["model"], "cache": None}}))
    with pytest.raises(Exception, match="spec.model.cache"):
        md_of({"model": {"source": "builtin:tiny-mixtral", "cache": {"claimName": "models"}}})
