"""The fetch-model init container's download into the shared model cache: once per model and
revision, however many pods start together."""

import multiprocessing
import time

import pytest

from model_runtime.fetch import MARKER, fetch

pytestmark = pytest.mark.unit


def slow_download(repo_id, revision, local_dir, calls=None):
    time.sleep(0.5)
    (__import__("pathlib").Path(local_dir) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
    with open(f"{local_dir}/downloads.log", "a") as f:
        f.write(f"{repo_id}@{revision}\n")


def pod(target, results):
    results.put(fetch("org/model", "v1", target, download=slow_download))


def test_pods_that_start_together_download_once(tmp_path):
    target = tmp_path / "cache" / "org" / "model@v1"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    pods = [context.Process(target=pod, args=(target, results)) for _ in range(4)]
    for p in pods:
        p.start()
    for p in pods:
        p.join(30)
    downloaded = sorted(results.get(timeout=5) for _ in pods)
    assert downloaded == [False, False, False, True]
    assert (target / "downloads.log").read_text() == "org/model@v1\n"
    assert (target / MARKER).is_file()
    # a later pod (a restart, another rank, a new revision of the deployment) finds it there
    assert fetch("org/model", "v1", target, download=slow_download) is False


def test_an_interrupted_download_is_done_again(tmp_path):
    target = tmp_path / "m"

    def fails(**kwargs):
        raise OSError("connection reset")

    with pytest.raises(OSError):
        fetch("org/model", None, target, download=fails)
    assert not (target / MARKER).exists()
    assert fetch("org/model", None, target, download=slow_download) is True
