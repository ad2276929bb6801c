"""The local node agent's pure parts: env, downward API, IPs, back-off, probes, phase, status."""

import base64

import pytest

from devcluster.node.containers import crash_backoff, should_restart
from devcluster.node.context import IpAllocator
from devcluster.node.env import (
    ConfigError,
    base_environment,
    container_env,
    env_sources,
    expand_vars,
    field_ref_value,
    find_executable,
    mount_env,
    mount_env_name,
    object_data,
    resource_field_value,
)
from devcluster.node.logs import container_runs, log_slice, log_tail, rotate_log
from devcluster.node.probes import ProbeTracker, probe_port
from devcluster.node.status import ContainerRecord, pod_phase, pod_status, terminated_state
from devcluster.node.volumes import volume_files

pytestmark = pytest.mark.unit

POD = {
    "metadata": {"name": "web-0", "namespace": "team", "uid": "u-1", "labels": {"app": "web", "tier": "x"},
                 "annotations": {"a": "b"}},
    "spec": {"nodeName": "devcluster-local", "serviceAccountName": "runner", "restartPolicy": "Always",
             "containers": [{"name": "main", "command": ["python"],
                             "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}}}]},
    "status": {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"}]},
}


def test_expand_vars_follows_kubernetes_rules():
    env = {"A": "1", "B": "two"}
    assert expand_vars("$(A)-$(B)", env) == "1-two"
    assert expand_vars("$(MISSING) stays", env) == "$(MISSING) stays"
    assert expand_vars("$$(A) is escaped", env) == "$(A) is escaped"
    assert expand_vars("plain $A", env) == "plain $A"


@pytest.mark.parametrize("path,value", [
    ("metadata.name", "web-0"), ("metadata.namespace", "team"), ("metadata.uid", "u-1"),
    ("metadata.labels['app']", "web"), ("metadata.annotations['a']", "b"), ("metadata.labels['nope']", ""),
    ("status.podIP", "127.100.0.7"), ("status.hostIP", "127.0.0.1"), ("spec.nodeName", "devcluster-local"),
    ("spec.serviceAccountName", "runner"),
])
def test_field_ref_values(path, value):
    assert field_ref_value(POD, path, "127.100.0.7", "127.0.0.1") == value


def test_unknown_field_ref_is_a_config_error():
    with pytest.raises(ConfigError, match="fieldPath"):
        field_ref_value(POD, "spec.bogus", "", "")


def test_resource_field_ref_rounds_up_and_falls_back_to_allocatable():
    container = POD["spec"]["containers"][0]
    assert resource_field_value(container, {"resource": "limits.cpu"}, {}) == "2"
    assert resource_field_value(container, {"resource": "limits.cpu", "divisor": "1m"}, {}) == "1500"
    assert resource_field_value(container, {"resource": "limits.memory", "divisor": "1Mi"}, {}) == "1024"
    assert resource_field_value({}, {"resource": "limits.cpu"}, {"cpu": "8"}) == "8"


def test_container_env_order_sources_and_expansion():
    container = {
        "name": "main",
        "envFrom": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "s"}, "prefix": "S_"}],
        "env": [
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "URL", "value": "http://$(POD_IP):$(PORT)"},
            {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "PORT"}}},
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "x", "optional": True}}},
            {"name": "KUBERNETES_SERVICE_PORT", "value": "overridden"},
        ],
    }
    assert env_sources(container) == {("configmap", "cm"), ("secret", "s"), ("secret", "gone")}
    sources = {("configmap", "cm"): {"PORT": "8000"}, ("secret", "s"): {"pw": "hunter2"}, ("secret", "gone"): None}
    env = container_env(POD, container, pod_ip="127.100.0.9", host_ip="127.0.0.1",
                        base={"KUBERNETES_SERVICE_PORT": "6443", "PATH": "/bin"}, sources=sources,
                        node_allocatable={})
    assert env["POD_IP"] == "127.100.0.9"
    assert env["URL"] == "http://127.100.0.9:8000"
    assert env["FROM_CM"] == "8000" and env["S_pw"] == "hunter2" and env["PASSWORD"] == "hunter2"
    assert "OPT" not in env
    assert env["KUBERNETES_SERVICE_PORT"] == "overridden"
    assert env["PATH"] == "/bin"


def test_pod_ip_is_only_set_when_asked_for():
    env = container_env(POD, {"name": "main"}, pod_ip="127.100.0.9", host_ip="127.0.0.1", base={},
                        sources={}, node_allocatable={})
    assert "POD_IP" not in env


@pytest.mark.parametrize("env,message", [
    ([{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "missing"}}}], "key 'missing'"),
    ([{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}], "secret 'absent'"),
])
def test_missing_env_sources_are_config_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        container_env(POD, {"name": "c", "env": env}, pod_ip="", host_ip="", base={},
                      sources={("configmap", "cm"): {"k": "v"}, ("secret", "absent"): None}, node_allocatable={})


def test_object_data_decodes_secrets():
    secret = {"kind": "Secret", "data": {"a": base64.b64encode(b"x y").decode()}}
    assert object_data(secret) == {"a": "x y"}
    assert object_data(None) is None


def test_mount_env_names_and_sub_paths():
    assert mount_env_name("/models") == "DEVCLUSTER_MOUNT_MODELS"
    assert (mount_env_name("/var/run/secrets/kubernetes.io/serviceaccount")
            == "DEVCLUSTER_MOUNT_VAR_RUN_SECRETS_KUBERNETES_IO_SERVICEACCOUNT")
    assert mount_env_name("/") == "DEVCLUSTER_MOUNT_ROOT"
    container = {"volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                                  {"name": "data", "mountPath": "/data/x", "subPath": "sub"},
                                  {"name": "unknown", "mountPath": "/u"}]}
    assert mount_env(container, {"cache": "/tmp/c", "data": "/srv"}) == {
        "DEVCLUSTER_MOUNT_CACHE": "/tmp/c", "DEVCLUSTER_MOUNT_DATA_X": "/srv/sub"}


def test_volume_files_items_and_optional_keys():
    files = {"a": b"1", "b": b"2"}
    assert volume_files(files, None, "cm", False) == files
    assert volume_files(files, [{"key": "a", "path": "dir/a.txt"}], "cm", False) == {"dir/a.txt": b"1"}
    assert volume_files(files, [{"key": "zz", "path": "z"}], "cm", True) == {}
    with pytest.raises(ConfigError):
        volume_files(files, [{"key": "zz", "path": "z"}], "cm", False)


def test_ip_allocator_never_hands_out_a_held_address_and_rotates():
    ips = IpAllocator("127.100.0.0/29")  # 8 addresses: .0 and .7 are never used
    assert ips.hold("127.100.0.3", "old")
    assert not ips.hold("127.100.0.3", "other")
    assert not ips.hold("10.0.0.1", "x")
    got = [ips.allocate(f"p{i}") for i in range(4)]
    assert "127.100.0.3" not in got
    assert all(ip.startswith("127.100.0.") and ip not in ("127.100.0.0", "127.100.0.7") for ip in got)
    assert len(set(got)) == 4
    assert ips.allocate("p0") == got[0]  # one address per pod
    last = ips.allocate("p4")  # .1 .. .6 minus the held .3: five in all
    with pytest.raises(RuntimeError, match="exhausted"):
        ips.allocate("p-too-many")
    ips.release("p1")
    assert ips.allocate("p5") == got[1]
    assert last not in got


def test_crash_backoff_doubles_to_the_cap():
    assert [crash_backoff(n, 10, 300) for n in range(1, 9)] == [0, 10, 20, 40, 80, 160, 300, 300]


@pytest.mark.parametrize("policy,code,restart", [
    ("Always", 0, True), ("Always", 1, True), ("OnFailure", 0, False), ("OnFailure", 2, True),
    ("Never", 1, False),
])
def test_should_restart(policy, code, restart):
    assert should_restart(policy, code) is restart


def test_probe_tracker_thresholds():
    tracker = ProbeTracker.for_probe({"successThreshold": 2, "failureThreshold": 3}, initial=False)
    assert not tracker.observe(True) and not tracker.result
    assert tracker.observe(True) and tracker.result
    assert not tracker.observe(False) and not tracker.observe(False) and tracker.result
    assert tracker.observe(False) and not tracker.result


def test_probe_port_by_name():
    container = {"ports": [{"name": "http", "containerPort": 8000}]}
    assert probe_port("http", container) == 8000
    assert probe_port(81, container) == 81
    with pytest.raises(ValueError, match="grpc"):
        probe_port("grpc", container)


def _running():
    return ContainerRecord("c", state={"running": {"startedAt": "t"}}, ready=True, started=True)


def _terminated(code):
    return ContainerRecord("c", state={"terminated": {"exitCode": code}})


def test_pod_phase():
    assert pod_phase("Always", False, False, [ContainerRecord("c")]) == "Pending"
    assert pod_phase("Always", True, False, [ContainerRecord("c")]) == "Pending"
    assert pod_phase("Always", True, False, [_running()]) == "Running"
    assert pod_phase("Never", True, False, [_terminated(0)]) == "Succeeded"
    assert pod_phase("Never", True, False, [_terminated(0), _terminated(1)]) == "Failed"
    assert pod_phase("OnFailure", True, False, [_terminated(0)]) == "Succeeded"
    backing_off = ContainerRecord("c", state={"waiting": {"reason": "CrashLoopBackOff"}},
                                  last_state={"terminated": {"exitCode": 1}})
    assert pod_phase("Always", True, False, [backing_off]) == "Running"
    assert pod_phase("Never", False, True, [ContainerRecord("c")]) == "Failed"


def test_pod_status_conditions_and_ips():
    status = pod_status(POD, init=[], main=[_running()], init_done=True, init_failed=False,
                        pod_ip="127.100.0.4", host_ip="127.0.0.1", start_time="t1", now="t2")
    conditions = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Running"
    assert status["podIP"] == "127.100.0.4" and status["podIPs"] == [{"ip": "127.100.0.4"}]
    assert conditions["Ready"]["status"] == "True" and conditions["ContainersReady"]["status"] == "True"
    assert conditions["PodScheduled"]["lastTransitionTime"] == "t0"
    assert conditions["Ready"]["lastTransitionTime"] == "t2"
    # A condition keeps its transition time while its status stays.
    again = pod_status({**POD, "status": status}, init=[], main=[_running()], init_done=True,
                       init_failed=False, pod_ip="127.100.0.4", host_ip="127.0.0.1", start_time="t1", now="t3")
    assert {c["type"]: c for c in again["conditions"]}["Ready"]["lastTransitionTime"] == "t2"
    unready = pod_status(POD, init=[], main=[ContainerRecord("c", state={"running": {}})], init_done=True,
                         init_failed=False, pod_ip="127.100.0.4", host_ip="127.0.0.1", start_time="t1", now="t2")
    ready = {c["type"]: c for c in unready["conditions"]}["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "ContainersNotReady" and "[c]" in ready["message"]


def test_terminated_state_from_signals():
    killed = terminated_state(-15, "a", "b", "devcluster://1")
    assert killed["exitCode"] == 143 and killed["signal"] == 15 and killed["reason"] == "Error"
    assert terminated_state(0, "a", "b", None)["reason"] == "Completed"


def test_find_executable(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert find_executable("tool", f"/nonexistent:{tmp_path}", None) == str(tool)
    assert find_executable("./tool", "", str(tmp_path)) == str(tmp_path / "tool")
    assert find_executable("no-such-tool-xyz", str(tmp_path), None) is None


def test_base_environment_keeps_secrets_of_the_agent_out():
    env = base_environment({"PATH": "/usr/bin", "HOME": "/root", "KUBECONFIG": "/admin", "HF_HOME": "/hf",
                            "AWS_SECRET": "x"}, "/venv/bin")
    assert env == {"PATH": "/venv/bin:/usr/bin", "HOME": "/root", "HF_HOME": "/hf"}


def test_log_tail_reads_the_last_run_only(tmp_path):
    log = tmp_path / "c.log"
    log.write_text("--- devcluster: t1 starting a\nold run\n--- devcluster: t2 starting a\nTraceback\nValueError: x\n")
    assert log_tail(log) == "Traceback\nValueError: x"
    assert log_tail(tmp_path / "missing.log") == ""


def test_container_runs_and_log_slices():
    text = "--- devcluster: t1 starting a\none\ntwo\n--- devcluster: t2 starting a\nthree\nfour\nfive\n"
    assert container_runs(text) == ["one\ntwo\n", "three\nfour\nfive\n"]
    assert container_runs("no marker\n") == ["no marker\n"]
    assert log_slice("a\nb\nc\n", 2, None) == "b\nc\n"
    assert log_slice("a\nb\nc\n", 0, None) == ""
    assert log_slice("abcdef", None, 3) == "abc"


def test_rotate_log_keeps_the_writer_appending(tmp_path):
    log = tmp_path / "c.log"
    with open(log, "ab") as writer:
        writer.write(b"old\n")
        writer.flush()
        rotate_log(log)
        writer.write(b"new\n")
    assert log.read_bytes() == b"new\n"
    assert (tmp_path / "c.log.1").read_bytes() == b"old\n"
