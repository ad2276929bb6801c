"""Reading a ModelDeployment: defaults, model sources, and the refusals the CRD cannot express."""

import pytest
from moe_operator.api.spec import ModelDeployment, ModelSource, SpecError, parse_duration

pytestmark = pytest.mark.unit


def body(spec=None, name="chat-moe", **meta):
    return {"metadata": {"name": name, "namespace": "ns", "uid": "uid-1", "generation": 3, **meta},
            "spec": {"model": {"source": "builtin:tiny-deepseek-v3"}, **(spec or {})}}


def test_defaults():
    md = ModelDeployment.from_body(body())
    assert (md.name, md.namespace, md.uid, md.generation) == ("chat-moe", "ns", "uid-1", 3)
    assert md.replicas == 1
    assert md.model.served_name == "chat-moe"          # defaults to the object's name
    assert md.model.dtype == "bfloat16"
    assert md.resources.gpus == 1 and md.resources.gpu_resource == "nvidia.com/gpu"
    assert md.pods_per_replica == 1
    assert md.rollout.strategy == "Canary" and md.rollout.steps == ()
    assert md.rollout.analysis.interval_seconds == 10
    assert md.autoscaling is None
    assert md.surge_gpus == 1                           # one group's GPUs


def test_gpus_per_group_and_surge_budget():
    md = ModelDeployment.from_body(body({"resources": {"gpus": 8}, "topology": {"podsPerReplica": 2},
                                         "rollout": {"maxSurgeGPUs": 4}}))
    assert md.gpus_per_group == 16
    assert md.surge_gpus == 4


@pytest.mark.parametrize("uri, expected", [
    ("pvc://weights/deepseek/v3", dict(scheme="pvc", claim="weights", path="deepseek/v3")),
    ("pvc://weights", dict(scheme="pvc", claim="weights", path="")),
    ("hostpath:///data/models/mixtral", dict(scheme="hostpath", path="/data/models/mixtral")),
    ("hf://deepseek-ai/DeepSeek-V3", dict(scheme="hf", repo="deepseek-ai/DeepSeek-V3", revision=None)),
    ("hf://Qwen/Qwen3-30B-A3B@main", dict(scheme="hf", repo="Qwen/Qwen3-30B-A3B", revision="main")),
    ("builtin:tiny-mixtral", dict(scheme="builtin")),
])
def test_model_sources(uri, expected):
    src = ModelSource.parse(uri)
    for key, value in expected.items():
        assert getattr(src, key) == value


@pytest.mark.parametrize("uri", ["s3://bucket/x", "pvc://Bad_Claim/x", "hostpath://relative", "hf://only-org",
                                 "builtin:", "hostpath:///a/../etc"])
def test_bad_model_sources_name_the_field(uri):
    with pytest.raises(SpecError) as err:
        ModelSource.parse(uri)
    assert err.value.field == "spec.model.source"


@pytest.mark.parametrize("spec, field", [
    ({"replicas": -1}, "spec.replicas"),
    ({"model": {"source": "builtin:x", "dtype": "int4"}}, "spec.model.dtype"),
    ({"model": {}}, "spec.model.source"),
    ({"resources": {"gpus": -1}}, "spec.resources.gpus"),
    ({"topology": {"podsPerReplica": 0}}, "spec.topology.podsPerReplica"),
    ({"runtime": {"args": ["--model=/x"]}}, "spec.runtime.args"),
    ({"runtime": {"env": [{"name": "MOE_RANK", "value": "3"}]}}, "spec.runtime.env"),
    ({"rollout": {"strategy": "Linear"}}, "spec.rollout.strategy"),
    ({"rollout": {"canary": {"steps": [{"setWeight": 50}, {"setWeight": 20}]}}},
     "spec.rollout.canary.steps[1].setWeight"),
    ({"rollout": {"canary": {"steps": [{"setWeight": 10, "pause": {}}]}}}, "spec.rollout.canary.steps[0]"),
    ({"rollout": {"canary": {"steps": [{"pause": {"duration": "ten"}}]}}},
     "spec.rollout.canary.steps[0].pause.duration"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "spec.autoscaling"),
    ({"autoscaling": {"maxReplicas": 2, "metric": "PromQL"}}, "spec.autoscaling.query"),
])
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(SpecError) as err:
        ModelDeployment.from_body(body(spec))
    assert err.value.field == field


@pytest.mark.parametrize("name", ["Chat", "9chat", "x" * 56, "chat_moe"])
def test_names_that_cannot_name_services(name):
    with pytest.raises(SpecError) as err:
        ModelDeployment.from_body(body(name=name))
    assert err.value.field == "metadata.name"


def test_canary_steps():
    md = ModelDeployment.from_body(body({"rollout": {"canary": {"steps": [
        {"setWeight": 10}, {"pause": {"duration": "1m30s"}}, {"setWeight": 50}, {"pause": {}}]}}}))
    steps = md.rollout.steps
    assert [s.set_weight for s in steps] == [10, None, 50, None]
    assert steps[1].is_pause and steps[1].pause_seconds == 90
    assert steps[3].is_pause and steps[3].pause_seconds is None


@pytest.mark.parametrize("text, seconds", [("0", 0), ("30s", 30), ("1h30m", 5400), ("500ms", 0.5),
                                           ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_typed_spec_ignores_status_in_equality():
    a = ModelDeployment.from_body({**body(), "status": {"phase": "x"}})
    assert a == ModelDeployment.from_body(body())
    assert a.status == {"phase": "x"}
