"""The Helm chart's files, without helm or a cluster: the CRD has one source (the chart's copy equals
crds/modeldeployments.yaml), values.yaml documents every key, and values.schema.json knows every key.
Rendering, lint and installs are tests/cluster/test_helm.py."""

import json
import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "moe-operator"
KEY = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):(\s|$)")


def test_the_charts_crd_is_the_source():
    copy = CHART / "files" / "crds" / "modeldeployments.yaml"
    assert copy.read_bytes() == (ROOT / "crds" / "modeldeployments.yaml").read_bytes(), (
        "charts/moe-operator/files/crds/modeldeployments.yaml differs from crds/: run `make chart-crds`")


def undocumented_keys(text: str) -> list[str]:
    """Keys of values.yaml without a comment right above them. A key documented with `# --` covers its
    children (a Kubernetes object such as a securityContext, documented as a whole)."""
    missing, stack, previous = [], [], ""   # stack: (indent, covers children)
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        match = KEY.match(line)
        if match and not stripped.startswith("#"):
            indent = len(match.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            commented = previous.startswith("#")
            if not commented and not any(covers for _, covers in stack):
                missing.append(f"line {number}: {match.group(2)}")
            stack.append((indent, commented and comment_block_starts_with_dash(text, number)))
        previous = stripped
    return missing


def comment_block_starts_with_dash(text: str, key_line: int) -> bool:
    lines = text.splitlines()[:key_line - 1]
    block = []
    for line in reversed(lines):
        if not line.strip().startswith("#"):
            break
        block.append(line.strip())
    return bool(block) and block[-1].startswith("# --")


def test_every_value_is_documented():
    assert undocumented_keys((CHART / "values.yaml").read_text()) == []


def test_the_documentation_check_catches_an_undocumented_key():
    assert undocumented_keys("# -- a\na: 1\nb:\n  c: 2\n") == ["line 3: b", "line 4: c"]


def key_paths(values: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out.extend(key_paths(value, path + "."))
    return out


def schema_knows(schema: dict, path: str) -> bool:
    node = schema
    for part in path.split("."):
        props = node.get("properties")
        if props is None:
            return node.get("type") == "object" and node.get("additionalProperties", True) is not False
        if part not in props:
            return False
        node = props[part]
    return True


def test_the_schema_knows_every_value_and_refuses_unknown_ones():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert [p for p in key_paths(values) if not schema_knows(schema, p)] == []
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) - {"global"} == set(values)


def test_chart_version_and_default_image_follow_the_project_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert chart["appVersion"] == project
    assert yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"] == "ghcr.io/moe-operator/operator"


def gitops_objects() -> list[dict]:
    return [doc for path in sorted((ROOT / "examples" / "gitops").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_gitops_examples_install_this_chart_with_values_it_knows():
    schema = json.loads((CHART / "values.schema.json").read_text())
    releases = [o for o in gitops_objects() if o["kind"] in ("Application", "HelmRelease")]
    charts = [o for o in releases if "charts/moe-operator" in json.dumps(o["spec"])]
    assert {o["kind"] for o in charts} == {"Application", "HelmRelease"}
    for release in charts:
        values = release["spec"].get("values") or release["spec"]["source"]["helm"]["valuesObject"]
        assert [p for p in key_paths(values) if not schema_knows(schema, p)] == [], release["metadata"]["name"]
    (kustomization,) = [o for o in gitops_objects() if o["kind"] == "Kustomization"]
    (check,) = kustomization["spec"]["healthCheckExprs"]
    assert (check["apiVersion"], check["kind"]) == ("serving.moe.dev/v1alpha1", "ModelDeployment")
    assert "'Degraded'" in check["failed"] and "'Available'" in check["current"]
