"""The CRD file: contract names, a structural schema with descriptions, and defaults that agree with
the operator's own reading of a spec (spec.py mirrors them)."""

from pathlib import Path

import pytest
import yaml
from moe_operator.api import names
from moe_operator.api.spec import ModelDeployment

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "modeldeployments.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def apply_defaults(schema, value):
    """Structural defaulting as the API server does it: a missing property takes its default when its
    parent object exists; recursion into objects and array items."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, prop in (schema.get("properties") or {}).items():
            if key not in value and "default" in prop:
                value[key] = yaml.safe_load(yaml.safe_dump(prop["default"]))
            if key in value:
                value[key] = apply_defaults(prop, value[key])
    elif isinstance(value, list) and "items" in schema:
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def walk(schema, path="$"):
    yield path, schema
    for key, prop in (schema.get("properties") or {}).items():
        yield from walk(prop, f"{path}.{key}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def test_contract_names():
    assert CRD["metadata"]["name"] == f"{names.PLURAL}.{names.GROUP}"
    assert CRD["spec"]["names"]["kind"] == names.KIND
    assert CRD["spec"]["names"]["shortNames"] == ["md"]
    assert VERSION["name"] == names.VERSION
    assert VERSION["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in VERSION["subresources"]


def test_printer_columns_cover_what_users_watch():
    columns = {c["name"]: c["jsonPath"] for c in VERSION["additionalPrinterColumns"]}
    assert columns["Model"] == ".spec.model.source"
    assert columns["Desired"] == ".spec.replicas"
    assert columns["Ready"] == ".status.readyReplicas"
    assert columns["Strategy"] == ".spec.rollout.strategy"
    assert columns["Phase"] == ".status.phase"
    assert columns["Weight"] == ".status.canaryWeight"
    assert columns["Revision"] == ".status.currentRevision"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_schema_is_structural_and_described():
    for path, node in walk(SCHEMA["properties"]["spec"], "spec"):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if path.count(".") <= 3 and not path.endswith(("[]", "{}")) and "tolerations" not in path:
            assert node.get("description"), f"{path} has no description"


def test_contract_spec_fields_exist():
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert set(spec["model"]["properties"]) >= {"source", "servedName", "dtype"}
    assert spec["model"]["properties"]["dtype"]["enum"] == ["float32", "bfloat16", "float16"]
    assert set(spec["runtime"]["properties"]) >= {"image", "args", "env"}
    assert set(spec["resources"]["properties"]) >= {"gpus", "gpuResource", "cpu", "memory"}
    assert "podsPerReplica" in spec["topology"]["properties"]
    rollout = spec["rollout"]["properties"]
    assert rollout["strategy"]["enum"] == ["Canary", "BlueGreen"]
    assert set(rollout) >= {"canary", "blueGreen", "maxSurgeGPUs", "analysis"}
    assert set(rollout["blueGreen"]["properties"]) >= {"previewReplicas", "autoPromotionSeconds",
                                                       "scaleDownDelaySeconds"}
    assert set(rollout["analysis"]["properties"]) >= {"interval", "slo", "alerts", "prometheus"}
    assert set(spec["autoscaling"]["properties"]) >= {"minReplicas", "maxReplicas", "metric", "target"}


def test_conditions_are_a_list_map_by_type():
    conditions = SCHEMA["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_name_limit_matches_the_longest_service_name():
    rules = [r["rule"] for r in SCHEMA["x-kubernetes-validations"]]
    assert any(f"size() <= {names.MAX_NAME_LENGTH}" in r for r in rules)
    assert len(names.service_name("x" * names.MAX_NAME_LENGTH, "preview")) == 63


@pytest.mark.parametrize("spec", [
    {"model": {"source": "builtin:tiny-mixtral"}},
    {"model": {"source": "hf://org/name"}, "rollout": {"strategy": "BlueGreen", "blueGreen": {}},
     "autoscaling": {"maxReplicas": 4}},
    {"model": {"source": "pvc://claim/path"}, "rollout": {"canary": {"steps": [{"setWeight": 10}, {"pause": {}}]}}},
])
def test_crd_defaults_agree_with_the_typed_spec(spec):
    body = {"apiVersion": names.API_VERSION, "kind": names.KIND,
            "metadata": {"name": "m", "namespace": "ns"}, "spec": spec}
    defaulted = apply_defaults(SCHEMA, yaml.safe_load(yaml.safe_dump(body)))
    assert defaulted != body or spec == {}
    assert ModelDeployment.from_body(defaulted) == ModelDeployment.from_body(body)


def test_no_stray_keys_from_yaml_flow_mappings():
    """A comma inside an unquoted flow-mapping description silently makes a new key."""
    for path, node in walk(SCHEMA):
        for key in node.get("properties") or {}:
            assert key.replace("-", "").isalnum(), f"{path}: odd property name {key!r}"
    for column in VERSION["additionalPrinterColumns"]:
        assert set(column) <= {"name", "type", "jsonPath", "description", "priority", "format"}, column
