"""Running test files in a child pytest with an environment of their own, for the tests whose
kernels must be built differently from the start (MOE_RUNTIME_AMX_EMULATE=1: the AMX tiles in
software; TRITON_INTERPRET=1: Triton's interpreter, on only if set before Triton is imported).

Not a test module."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(files: list[str], env: dict[str, str], report: Path, timeout: int = 900) -> tuple[list[str], dict[str, str]]:
    """pytest on `files` in a child process (this one's environment and `env`), which must pass:
    (the names of the tests that passed, {the name of each skipped test: why})."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files],
        cwd=REPO_ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed, skipped = [], {}
    for case in ET.parse(report).getroot().iter("testcase"):
        if (skip := case.find("skipped")) is not None:
            skipped[case.get("name")] = skip.get("message", "")
        elif not list(case):  # no failure or error child
            passed.append(case.get("name"))
    return passed, skipped
