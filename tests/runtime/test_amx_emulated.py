"""The AMX kernels' tests on a CPU without AMX, their tiles emulated in software.

On a CPU with AMX the kernels' tests (test_cpu_decode.py, test_paged_attention_kernel.py,
test_prefill_shapes.py) run on the tiles themselves. On one with AVX512-BF16 and no AMX (AMD Zen 4)
they would be skipped, and the AMX kernels' own logic (packing rows, the zero-padded last tile, the
sinks, the passes over a long prefill, the helpers' shares of a job) would go unchecked between
visits to an AMX machine. Here they run in a child pytest with MOE_RUNTIME_AMX_EMULATE=1, which
builds the same kernels with each tile instruction a scalar loop (csrc/amx_tiles.h, decision 43).
"""

from __future__ import annotations

import child_pytest
import pytest

from model_runtime.kernels import cpu_decode

KERNEL_TESTS = [
    "tests/runtime/test_cpu_decode.py",
    "tests/runtime/test_paged_attention_kernel.py",
    "tests/runtime/test_prefill_shapes.py",
]


@pytest.mark.skipif(not cpu_decode.available(), reason="no CPU kernels here")
@pytest.mark.skipif(cpu_decode.moe_amx_enabled(), reason="this CPU runs the AMX tests on its tiles")
@pytest.mark.skipif(not cpu_decode._dpbf16, reason="this CPU has no AVX512-BF16 to run the AMX kernels' other parts")
def test_the_amx_kernels_pass_their_tests_with_the_tiles_emulated(tmp_path):
    passed, skipped = child_pytest.run(KERNEL_TESTS, {"MOE_RUNTIME_AMX_EMULATE": "1"}, tmp_path / "report.xml")
    not_run = {name: why for name, why in skipped.items() if "no AMX" in why}
    assert not not_run, f"AMX tests still skipped with the tiles emulated: {not_run}"
    amx_passed = [name for name in passed if "amx" in name.lower()]
    # the AMX linear (10 shapes), its dispatch, the start-up switch, the helpers, MLA's heads, the
    # paged decode's AMX scores (GQA, MLA, shared), an engine's tokens: all run, none skipped
    assert len(amx_passed) >= 20, amx_passed
