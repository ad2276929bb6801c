"""The C kernels are compiled once per source, the headers beside it and flags: editing a shared
header (csrc/simd_exp.h) gives a new library, never a stale one from the cache."""

import ctypes

import pytest

from model_runtime.kernels.build import build_library

pytestmark = pytest.mark.runtime


def test_a_changed_header_is_compiled_again_and_the_new_library_uses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_RUNTIME_KERNEL_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "value.h").write_text("#define VALUE 1\n")
    source = src / "k.c"
    source.write_text('#include "value.h"\nint moe_value(void) { return VALUE; }\n')
    flags = ["-O2", "-shared", "-fPIC"]
    first = build_library(source, flags)
    assert build_library(source, flags) == first            # compiled once
    assert ctypes.CDLL(str(first)).moe_value() == 1
    (src / "value.h").write_text("#define VALUE 2\n")
    second = build_library(source, flags)
    assert second != first
    assert ctypes.CDLL(str(second)).moe_value() == 2
