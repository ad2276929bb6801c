"""Compiling the runtime's C kernels (csrc/*.c) once per source and flags, with the system's C
compiler, into a cache shared by every process on the machine (decision 14)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where compiled kernels live: $MOE_RUNTIME_KERNEL_CACHE, else the user's cache, else tmp."""
    if os.environ.get("MOE_RUNTIME_KERNEL_CACHE"):
        return Path(os.environ["MOE_RUNTIME_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moe-runtime" / "kernels"


def amx_emulated() -> bool:
    """Whether the kernels are built with their AMX tiles emulated in software
    (MOE_RUNTIME_AMX_EMULATE=1: csrc/amx_tiles.h's scalar tiles), so the AMX kernels' logic runs and
    is checked on a CPU with AVX512-BF16 but no AMX. For tests: far slower than real tiles."""
    return os.environ.get("MOE_RUNTIME_AMX_EMULATE", "0") == "1"


def amx_flags() -> list[str]:
    """The compiler flags amx_emulated() asks for."""
    return ["-DMOE_AMX_EMULATE"] if amx_emulated() else []


def build_library(source: Path, cflags: list[str]) -> Path:
    """The shared library for `source`, compiled once per source, the headers beside it and flags
    (atomic rename), named `<source stem>-<hash>.so`."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):   # what the sources include ("simd_exp.h")
        digest.update(header.name.encode() + header.read_bytes())
    digest.update(" ".join(cflags).encode())
    key = digest.hexdigest()[:16]
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler (gcc, cc or $CC) on PATH")
    last_error: Exception | None = None
    for directory in (cache_dir(), Path(tempfile.gettempdir()) / f"moe-runtime-kernels-{os.getuid()}"):
        lib = directory / f"{source.stem}-{key}.so"
        if lib.exists():
            return lib
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
            os.close(fd)
            try:
                subprocess.run([compiler, *cflags, "-o", tmp, str(source)],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(tmp, lib)  # concurrent builders (several pods on one node) race harmlessly
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return lib
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{compiler} failed on {source}: {e.stderr.strip()[-500:]}") from e
        except OSError as e:  # an unwritable cache: try the next place
            last_error = e
    raise RuntimeError(f"no writable kernel cache directory: {last_error}")
