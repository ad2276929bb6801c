"""`python -m model_runtime.fetch REPO REVISION TARGET`: the `fetch-model` init container of a pod
whose model is `hf://ORG/NAME[@REVISION]`.

It downloads the checkpoint into TARGET once. TARGET is on the pod's own emptyDir, or on the shared
model cache (`spec.model.cache.claimName`: a ReadWriteMany PersistentVolumeClaim, or one per node),
where every pod, restart and rank of every revision of the same model finds it already there:
a marker file says a download completed, and a lock file beside TARGET makes the pods that start
together wait for the one that downloads instead of downloading it again each. The runtime then
reads only its own shards of it (safetensors slices).
"""

from __future__ import annotations

import fcntl
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("model_runtime.fetch")

MARKER = ".moe-fetch-complete"


def fetch(repo: str, revision: str | None, target: str | Path, download: Callable[..., object] | None = None) -> bool:
    """Make TARGET hold `repo` at `revision`; True if this call downloaded it, False if it was
    there already (downloaded by an earlier pod, or by the one this call waited for)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    marker = target / MARKER
    if marker.is_file():
        log.info("%s@%s is in the cache already (%s)", repo, revision or "main", target)
        return False
    with open(f"{target}.lock", "a") as lock:
        started = time.monotonic()
        fcntl.flock(lock, fcntl.LOCK_EX)   # another pod downloading it: wait for it
        if marker.is_file():
            log.info("%s@%s was downloaded by another pod while this one waited %.0fs", repo,
                     revision or "main", time.monotonic() - started)
            return False
        if download is None:
            from huggingface_hub import snapshot_download as download
        log.info("downloading %s@%s into %s", repo, revision or "main", target)
        download(repo_id=repo, revision=revision or None, local_dir=str(target))
        marker.write_text(json.dumps({"repo": repo, "revision": revision, "completed": time.time()}))
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m model_runtime.fetch REPO REVISION TARGET (REVISION may be '')", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repo, revision, target = args
    fetch(repo, revision or None, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
