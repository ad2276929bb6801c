"""The engine in a child process: what happens when it cannot load or dies, and how the server
built on it behaves then (not live, 503, no orphan process after SIGTERM). The streaming
behaviour both engine fronts share is in test_engine_async.py."""

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from model_runtime import load_tokenizer
from model_runtime.engine.config import EngineConfig
from model_runtime.engine.messages import EngineSpec
from model_runtime.engine.process import EngineProcess, EngineProcessError
from model_runtime.engine.requests import EngineOverloaded, SamplingParams

pytestmark = pytest.mark.runtime

SRC = "builtin:tiny-mixtral"


def spec(model: str = SRC) -> EngineSpec:
    return EngineSpec(model, "float32", "cpu", EngineConfig(max_num_seqs=4, num_kv_blocks=64), num_threads=1)


def engine_children(pid: int) -> list[int]:
    """Pids of the engine processes a server process started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"multiprocessing.spawn" in cmdline:
            found.append(int(proc.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_a_model_that_cannot_load_fails_start_with_the_reason():
    engine = EngineProcess(spec("builtin:no-such-model"), load_tokenizer(SRC))
    with pytest.raises(EngineProcessError, match="no-such-model"):
        await engine.start()
    assert not engine.is_running
    assert engine._process.exitcode is not None  # no process left behind
    with pytest.raises(EngineOverloaded, match="not running"):
        engine.generate("hi", SamplingParams())


async def test_streams_fail_with_a_reason_when_the_engine_process_dies():
    engine = EngineProcess(spec(), load_tokenizer(SRC))
    await engine.start()
    try:
        params = SamplingParams(max_tokens=100_000 // 64, ignore_eos=True)
        stream = engine.generate([1, 2, 3], params)
        await anext(stream)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="engine process exited"):
            async with asyncio.timeout(30):
                async for _ in stream:
                    pass
        assert not engine.is_running
        with pytest.raises(EngineOverloaded, match="not running"):
            engine.generate("hi", SamplingParams())
    finally:
        await engine.stop(drain_timeout=0)


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise, never), or "" where it has none."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


async def test_the_engine_process_asks_for_huge_pages_and_gets_them_where_the_kernel_gives_them(monkeypatch):
    """decision 41: the engine process starts with glibc's malloc advising huge pages for its large
    blocks (its KV cache among them: 64 blocks of tiny-mixtral's float32 are several MB); the
    server's own environment is left as it was; MOE_RUNTIME_HUGE_PAGES=0 leaves it out."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    for switch in ("1", "0"):
        monkeypatch.setenv("MOE_RUNTIME_HUGE_PAGES", switch)
        engine = EngineProcess(
            EngineSpec(SRC, "float32", "cpu", EngineConfig(max_num_seqs=4, num_kv_blocks=4096, block_size=16),
                       num_threads=1), load_tokenizer(SRC),
        )  # fmt: skip
        await engine.start()
        try:
            env = Path(f"/proc/{engine.pid}/environ").read_bytes().split(b"\0")
            huge_kb = int(Path(f"/proc/{engine.pid}/smaps_rollup").read_text().split("AnonHugePages:")[1].split()[0])
        finally:
            await engine.stop(drain_timeout=0)
        assert (b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in env) == (switch == "1")
        assert "GLIBC_TUNABLES" not in os.environ
        if switch == "1" and thp_mode() in ("always", "madvise"):
            assert huge_kb >= 2048, huge_kb
        if switch == "0" and thp_mode() == "madvise":
            assert huge_kb == 0, huge_kb


def test_server_with_a_dead_engine_is_not_live_and_refuses_with_503(server_process):
    server = server_process()
    try:
        [engine_pid] = engine_children(server.proc.pid)
        os.kill(engine_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.base_url}/v2/health/live", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "still live with its engine gone"
            time.sleep(0.05)  # polling with a deadline
        assert httpx.get(f"{server.base_url}/v2/health/ready", timeout=5).status_code == 503
        r = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "tiny-mixtral", "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"], r.text
        assert "engine process exited" in server.logs()
    finally:
        server.stop()


def test_sigterm_stops_the_engine_process_too(server_process):
    server = server_process()
    [engine_pid] = engine_children(server.proc.pid)
    r = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"model": "tiny-mixtral", "prompt": "hi", "max_tokens": 4},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    assert server.stop() == 0, server.logs()
    deadline = time.monotonic() + 10
    while alive(engine_pid):
        assert time.monotonic() < deadline, "the engine process outlived its server"
        time.sleep(0.05)  # polling with a deadline
    assert "engine process exited" not in server.logs()  # a planned stop is not reported as a crash


def test_no_engine_process_serves_from_a_thread(server_process):
    server = server_process("--no-engine-process")
    try:
        assert engine_children(server.proc.pid) == []
        r = httpx.post(
            f"{server.base_url}/v1/completions",
            json={"model": "tiny-mixtral", "prompt": "hi", "max_tokens": 4, "ignore_eos": True},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        assert server.stop() == 0, server.logs()
