"""The real API server refuses every manifest of tests/cluster/invalid/ with a message naming the field
and the reason, and accepts every example; printer columns, short name and scale subresource work."""

from pathlib import Path

import pytest
import yaml

from devtools.harness import install_crd

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="session")
def cluster(plain_cluster):
    """These tests need no Prometheus or Alertmanager."""
    return plain_cluster


@pytest.fixture(scope="module")
def crd(cluster):
    install_crd(cluster)
    return cluster


def expectation(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <message>'"
    return first[len("# expect: "):]


def test_the_corpus_is_big_enough():
    assert len(INVALID) >= 15


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_refused_with_a_field_specific_message(crd, namespace, path):
    result = crd.kubectl("apply", "--server-side", "-n", namespace, "-f", str(path), check=False)
    assert result.returncode != 0, f"{path.name} was accepted:\n{result.stdout}"
    assert expectation(path) in result.stderr, result.stderr
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    assert crd.kubectl("get", "md", name, "-n", namespace, check=False).returncode != 0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_is_accepted(crd, namespace, path):
    crd.kubectl("apply", "--server-side", "--dry-run=server", "-n", namespace, "-f", str(path))


def test_defaults_columns_short_name_and_scale(crd, namespace):
    crd.apply({"apiVersion": "serving.moe.dev/v1alpha1", "kind": "ModelDeployment",
               "metadata": {"name": "plain", "namespace": namespace},
               "spec": {"model": {"source": "builtin:tiny-mixtral"}}})
    body = crd.get_json("md", "plain", "-n", namespace)
    spec = body["spec"]
    assert spec["replicas"] == 1 and spec["model"]["dtype"] == "bfloat16"
    assert spec["resources"] == {"gpus": 1, "gpuResource": "nvidia.com/gpu"}
    assert spec["rollout"]["strategy"] == "Canary" and spec["rollout"]["analysis"]["interval"] == "10s"
    header = crd.kubectl("get", "md", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "MODEL", "DESIRED", "READY", "STRATEGY", "PHASE", "STEP", "WEIGHT", "REVISION", "AGE"]
    crd.kubectl("scale", "md/plain", "-n", namespace, "--replicas=3")
    assert crd.get_json("md", "plain", "-n", namespace)["spec"]["replicas"] == 3
    scale = crd.get_json("--subresource=scale", "md", "plain", "-n", namespace)
    assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 3
    refused = crd.kubectl("scale", "md/plain", "-n", namespace, "--replicas=-1", check=False)
    assert refused.returncode != 0
