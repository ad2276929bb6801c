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


def cpus_allowed(pid: int) -> dict[int, set[int]]:
    """{thread id: the CPUs it may run on} for each thread of process pid."""
    masks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            line = next(x for x in (task / "status").read_text().splitlines() if x.startswith("Cpus_allowed_list:"))
        except (OSError, StopIteration):
            continue  # a thread that ended meanwhile
        cpus = set()
        for part in line.split(":", 1)[1].strip().split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        masks[int(task.name)] = cpus
    return masks


async def generate_while(engine, n: int):
    """Start n greedy streams and, once each has its first output, read the engine process's
    threads' CPUs; then read the streams to the end: (those CPUs, each stream's token ids)."""
    params = SamplingParams(max_tokens=120, temperature=0, ignore_eos=True)
    streams = [engine.generate([5 + i, 9, 13, 21], params) for i in range(n)]
    # a stream's request is submitted at its first anext: all at once, so that all n run together
    firsts = await asyncio.gather(*(anext(s) for s in streams))
    seen = cpus_allowed(engine.pid)
    outs = []
    for first, stream in zip(firsts, streams, strict=True):
        out = first
        async for out in stream:  # noqa: B007 (the last output has every token)
            pass
        outs.append(out.token_ids)
    return seen, outs


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to bind")
async def test_the_engine_step_thread_has_a_core_of_its_own_while_few_requests_run(monkeypatch):
    """decision 42: on the CPU with torch on one thread, while at most SMALL_BATCH requests run the
    engine process's step thread (its main thread) may run on the first of its CPUs only and every
    other thread of it (the kernels' helpers, the Outbox) on the others; with more requests every
    thread may run anywhere again; MOE_RUNTIME_CPU_BIND=0 binds nothing. What the engine computes
    is the same either way."""
    from model_runtime.engine.affinity import SMALL_BATCH

    cpus = os.sched_getaffinity(0)
    tokens = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("MOE_RUNTIME_CPU_BIND", switch)
        engine = EngineProcess(
            EngineSpec(SRC, "float32", "cpu", EngineConfig(max_num_seqs=8, num_kv_blocks=64), num_threads=1),
            load_tokenizer(SRC),
        )
        await engine.start()
        try:
            few, tokens[switch] = await generate_while(engine, 1)
            many, _ = await generate_while(engine, SMALL_BATCH + 2)
        finally:
            await engine.stop(drain_timeout=0)
        assert len(few) >= 3  # the step thread, the Outbox, the kernels' helper among them
        assert all(mask == cpus for mask in many.values()), many
        if switch == "0":
            assert all(mask == cpus for mask in few.values()), few
            continue
        step_cpus = few.pop(engine.pid)  # the first CPU no other engine on this host has claimed
        assert len(step_cpus) == 1 and step_cpus < cpus, step_cpus
        assert all(mask == cpus - step_cpus for mask in few.values()), few
    assert tokens["1"] == tokens["0"]


def test_the_step_core_binds_only_a_one_thread_cpu_engine_with_cores_to_spare(monkeypatch, tmp_path):
    from model_runtime.engine import affinity
    from model_runtime.engine.affinity import StepCore

    monkeypatch.setattr(affinity, "LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 5})
    core = StepCore.for_this_process("cpu", 1, distributed=False)
    assert (core.step_cpu, core.others, core.bound) == (2, {3, 5}, False)
    assert (tmp_path / "moe-runtime-step-cpu-2.lock").exists()
    core.release()
    assert StepCore.for_this_process("cuda:0", 1, distributed=False) is None
    assert StepCore.for_this_process("cpu", 4, distributed=False) is None  # torch's own threads
    assert StepCore.for_this_process("cpu", 1, distributed=True) is None  # ranks share the host
    monkeypatch.setenv("MOE_RUNTIME_CPU_BIND", "0")
    assert StepCore.for_this_process("cpu", 1, distributed=False) is None
    monkeypatch.delenv("MOE_RUNTIME_CPU_BIND")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert StepCore.for_this_process("cpu", 1, distributed=False) is None


def test_engines_on_one_host_claim_different_step_cores_and_none_when_all_are_taken(tmp_path):
    """Two engine processes with the same CPUs do not both bind their step threads to the first;
    a claim is a lock a process holds until it ends (here: until the file is closed)."""
    from model_runtime.engine.affinity import claim_cpu

    first = claim_cpu([4, 7], str(tmp_path))
    second = claim_cpu([4, 7], str(tmp_path))
    assert (first[0], second[0]) == (4, 7)
    assert claim_cpu([4, 7], str(tmp_path)) is None
    first[1].close()
    again = claim_cpu([4, 7], str(tmp_path))
    assert again[0] == 4
    again[1].close(), second[1].close()


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


async def test_the_server_moves_its_startup_heap_out_of_the_collectors_reach_once_ready():
    """decision 42: once loaded, the server's objects (app, tokenizer, engine front) are frozen
    (gc.freeze), so the oldest generation's collections while serving walk only what serving
    made; before, 66-71 ms pauses of the event loop at 32 streams."""
    import gc

    from model_runtime.serving.config import ServerConfig
    from model_runtime.serving.service import InferenceService

    gc.unfreeze()
    service = InferenceService(ServerConfig(SRC, dtype="float32", device="cpu", max_num_seqs=2))
    assert gc.get_freeze_count() == 0
    try:
        await service.load()
        frozen = gc.get_freeze_count()
        assert service.state == "ready"
        outputs = [o async for o in service.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True))]
        assert outputs[-1].finished and len(outputs[-1].token_ids) == 3  # it serves after the freeze
    finally:
        gc.unfreeze()
        await service.stop()
    assert frozen > 10_000, frozen  # the server's heap: tens of thousands of objects and more
