"""`up --gitops` without a cluster: Flux's build recipe, the controllers' command lines (loopback
only, no leader election, one namespace), the Flux objects, and the Git server (git http-backend
behind it) cloning and pushing for real on loopback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devcluster import gitserver
from devcluster.cluster import build, gitops, versions
from devcluster.loopback import free_port


def test_flux_is_not_part_of_make_tools_but_builds_on_demand():
    names = {c.name for c in versions.COMPONENTS}
    assert not names & {c.name for c in versions.FLUX_COMPONENTS}
    assert {c.key for c in versions.FLUX_COMPONENTS} == {"source-controller-v1.9.6", "kustomize-controller-v1.9.6"}


def test_flux_recipe_builds_the_released_module_with_the_api_replace_dropped():
    source, kustomize = versions.FLUX_COMPONENTS
    recipe = build.recipe(source, "2026-01-01T00:00:00Z")
    assert recipe.from_module and recipe.targets == {"source-controller": "."}
    assert recipe.mod_edits == ("-dropreplace=github.com/fluxcd/source-controller/api",
                                "-require=github.com/fluxcd/source-controller/api@v1.9.6",
                                "-require=github.com/fluxcd/pkg/artifact@v0.18.0")
    assert "crds/source.toolkit.fluxcd.io_gitrepositories.yaml" in recipe.data_files
    recipe = build.recipe(kustomize, "2026-01-01T00:00:00Z")
    assert recipe.mod_edits == ("-dropreplace=github.com/fluxcd/kustomize-controller/api",
                                "-require=github.com/fluxcd/kustomize-controller/api@v1.9.6")
    assert recipe.data_files == {"crds/kustomize.toolkit.fluxcd.io_kustomizations.yaml":
                                 "config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml"}


def test_mod_edits_turn_the_released_go_mod_into_a_buildable_main_module(tmp_path):
    """`go mod edit` with the recipe's arguments on a go.mod shaped as the release's."""
    (tmp_path / "go.mod").write_text(
        "module github.com/fluxcd/source-controller\n\ngo 1.26.0\n\n"
        "replace github.com/fluxcd/source-controller/api => ./api\n\n"
        "require (\n\tgithub.com/fluxcd/pkg/artifact v0.18.3\n"
        "\tgithub.com/fluxcd/source-controller/api v1.9.6\n)\n")
    recipe = build.recipe(versions.FLUX_COMPONENTS[0], "")
    subprocess.run(["go", "mod", "edit", *recipe.mod_edits], cwd=tmp_path, check=True, env=build.go_env())
    text = (tmp_path / "go.mod").read_text()
    assert "=> ./api" not in text
    assert "github.com/fluxcd/pkg/artifact v0.18.0" in text and "v0.18.3" not in text


def test_the_controllers_listen_on_loopback_only_and_elect_no_leader(tmp_path):
    args = gitops.source_controller_args(Path("/bin/sc"), metrics_port=1, health_port=2, storage_port=3,
                                         storage_path=tmp_path)
    args += gitops.kustomize_controller_args(Path("/bin/kc"), metrics_port=4, health_port=5)
    addresses = [a.split("=", 1)[1] for a in args if a.split("=")[0].endswith("-addr")]
    assert addresses and all(a.startswith("127.0.0.1:") for a in addresses)
    assert args.count("--enable-leader-election=false") == 2
    assert args.count("--watch-all-namespaces=false") == 2
    assert "--no-remote-bases=true" in args
    env = gitops.controller_env({"PATH": "/bin"}, tmp_path / "k")
    assert env["RUNTIME_NAMESPACE"] == "flux-system" and env["KUBECONFIG"] == str(tmp_path / "k")


def test_repository_objects_sync_deploy_from_main_and_carry_the_health_options():
    repo, kustomization = gitops.repository_objects("team", "http://127.0.0.1:9/team.git")
    assert repo["kind"] == "GitRepository" and repo["spec"]["ref"] == {"branch": "main"}
    assert kustomization["spec"]["path"] == "./deploy" and kustomization["spec"]["prune"] is True
    assert kustomization["spec"]["wait"] is False and "healthCheckExprs" not in kustomization["spec"]
    exprs = [{"apiVersion": "serving.moe.dev/v1alpha1", "kind": "ModelDeployment", "current": "true"}]
    ignore = [{"paths": ["/spec/replicas"], "target": {"kind": "ModelDeployment"}}]
    _, kustomization = gitops.repository_objects("team", "u", wait=True, health_check_exprs=exprs,
                                                 ignore=ignore, timeout="2m")
    assert kustomization["spec"]["healthCheckExprs"] == exprs and kustomization["spec"]["ignore"] == ignore
    assert kustomization["spec"]["timeout"] == "2m"


def test_cgi_environ_and_output():
    env = gitserver.cgi_environ(Path("/r"), "POST", "/x.git/git-upload-pack?a=b",
                                {"Content-Type": "application/x-git-upload-pack-request", "Git-Protocol": "version=2"},
                                "127.0.0.1", 12)
    assert env["PATH_INFO"] == "/x.git/git-upload-pack" and env["QUERY_STRING"] == "a=b"
    assert env["CONTENT_LENGTH"] == "12" and env["HTTP_GIT_PROTOCOL"] == "version=2"
    assert env["GIT_PROJECT_ROOT"] == "/r" and env["REMOTE_USER"]
    status, headers, body = gitserver.parse_cgi_output(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nno")
    assert (status, headers, body) == (404, [("Content-Type", "text/plain")], b"no")
    assert gitserver.parse_cgi_output(b"Content-Type: x\n\nbody")[::2] == (200, b"body")
    assert gitserver.parse_cgi_output(b"garbage")[0] == 502


@pytest.fixture
def git_server(tmp_path):
    root = tmp_path / "repos"
    gitserver.init_repository(root / "demo.git", gitops.INITIAL_FILES)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "devcluster.gitserver", "--root", str(root),
                                "--port", str(port)], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while subprocess.run(["git", "ls-remote", f"{url}/demo.git"], capture_output=True).returncode != 0:
        assert process.poll() is None and time.monotonic() < deadline, "the Git server did not start"
        time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(10)


def git(*args, cwd=None):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def test_clone_push_and_clone_again_through_git_http_backend(git_server, tmp_path):
    git("clone", "-q", f"{git_server}/demo.git", str(tmp_path / "a"))
    assert (tmp_path / "a" / "deploy" / ".keep").exists() and (tmp_path / "a" / "README.md").exists()
    (tmp_path / "a" / "deploy" / "cm.yaml").write_text("kind: ConfigMap\n")
    (tmp_path / "a" / "big.bin").write_bytes(os.urandom(2_000_000))  # > http.postBuffer: a chunked push
    git("add", "-A", cwd=tmp_path / "a")
    git("commit", "-q", "-m", "a manifest", cwd=tmp_path / "a")
    git("push", "-q", "origin", "main", cwd=tmp_path / "a")
    git("clone", "-q", f"{git_server}/demo.git", str(tmp_path / "b"))
    assert (tmp_path / "b" / "deploy" / "cm.yaml").read_text() == "kind: ConfigMap\n"
    assert git("log", "--format=%s", cwd=tmp_path / "b").split("\n")[:2] == ["a manifest", "initial commit"]


def test_an_unknown_repository_is_not_found(git_server, tmp_path):
    result = subprocess.run(["git", "ls-remote", f"{git_server}/nope.git"], capture_output=True, text=True)
    assert result.returncode != 0 and "not found" in result.stderr.lower()
