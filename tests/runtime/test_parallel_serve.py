"""`moe-runtime serve` as one replica over several ranks: in one pod (--tensor-parallel-size 2) and
over two "pods" (--nnodes 2, --node-rank 0/1, --master-addr 127.0.0.1), on the CPU with gloo.

What a user sees: the same seeded OpenAI text as one process (prefix-cache hits included: the
other ranks' caches hold their share of every block rank 0 reuses); the second pod answering health and
/metrics only; a lost rank making rank 0 not live and exiting; SIGTERM stopping every rank with 0.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import httpx
import openai
import pytest

from model_runtime.distributed.ranks import free_port

pytestmark = pytest.mark.runtime

MODEL, NAME = "builtin:tiny-deepseek-v3", "tiny-deepseek-v3"
# float32: ranks sum partial outputs in another order than one process does, which float32 keeps
# below what flips a greedy token of these prompts, bfloat16 (the default on AMX CPUs) not
COMMON = ("--seed", "0", "--max-model-len", "256", "--device", "cpu", "--dtype", "float32")
PROMPTS = ["The capital of", "Once upon a time", "1 2 3 4", "experts route tokens", "a", "zz top"]
# asked twice after the others: the second time its first blocks come from the prefix cache
SHARED_PREFIX = "Mixture-of-experts layers send each token to a few experts that a router picks. "


def completions(base_url: str) -> list[str]:
    """Seeded sampled and greedy completions, sent together (one batch of prefills and decodes)."""

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0)
        async with client:
            jobs = [
                client.completions.create(
                    model=NAME, prompt=p, max_tokens=12 + 3 * i, seed=i, temperature=0.9 if i % 2 else 0.0
                )
                for i, p in enumerate(PROMPTS)
            ]
            chat = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=10, seed=7
            )
            outs = await asyncio.gather(*jobs, chat)
            again = [
                await client.completions.create(model=NAME, prompt=SHARED_PREFIX + end, max_tokens=8, temperature=0)
                for end in ("Then", "Next")
            ]
        return [o.choices[0].text for o in outs[:-1]] + [outs[-1].choices[0].message.content] + [
            o.choices[0].text for o in again
        ]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def one_process(server_process):
    server = server_process(*COMMON, model=MODEL)
    yield completions(server.base_url)
    assert server.stop() == 0, server.logs()


def pod_pair(server_process, *extra: str):
    """Rank 0's pod and the second pod of one replica of 2 ranks (started together, both ready)."""
    port = str(free_port())
    group = (
        "--tensor-parallel-size",
        "2",
        "--nnodes",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        port,
    )
    second = server_process(*COMMON, *group, "--node-rank", "1", *extra, model=MODEL, startup_timeout_s=None)
    first = server_process(*COMMON, *group, "--node-rank", "0", *extra, model=MODEL, startup_timeout_s=None)
    first.wait_ready(120)
    second.wait_ready(30)
    return first, second


def live(server) -> bool:
    """/v2/health/live answers 200 (a server that has exited is not live either)."""
    try:
        return httpx.get(f"{server.base_url}/v2/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_exit(server, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and server.proc.poll() is None:
        time.sleep(0.1)
    return server.proc.poll()


@pytest.mark.parametrize("expert_parallel", [True, False], ids=["ep", "tp"])
def test_two_ranks_in_one_pod_serve_what_one_process_does(server_process, one_process, expert_parallel):
    extra = ("--enable-expert-parallel",) if expert_parallel else ()
    server = server_process(*COMMON, "--tensor-parallel-size", "2", *extra, model=MODEL)
    try:
        assert completions(server.base_url) == one_process
        metrics = httpx.get(f"{server.base_url}/metrics").text
        assert f'moe_weight_bytes{{model_name="{NAME}",rank="0"}}' in metrics
        assert f'moe_weight_bytes{{model_name="{NAME}",rank="1"}}' in metrics
        hits = re.search(rf'^moe_prefix_cache_hits_total{{model_name="{NAME}"}} (\S+)$', metrics, re.M)
        assert hits and float(hits[1]) >= 64, metrics  # at least the shared prefix's 4 blocks of 16
    finally:
        assert server.stop() == 0, server.logs()


def test_two_pods_serve_as_one_replica_until_the_second_is_lost(server_process, one_process):
    first, second = pod_pair(server_process, "--enable-expert-parallel", "--distributed-timeout", "5")
    try:
        assert completions(first.base_url) == one_process
        # the second pod holds rank 1: health and /metrics only
        assert httpx.get(f"{second.base_url}/v2/health/live").status_code == 200
        metrics = httpx.get(f"{second.base_url}/metrics").text
        assert f'moe_weight_bytes{{model_name="{NAME}",rank="1"}}' in metrics
        assert 'rank="0"' not in metrics
        refused = httpx.post(f"{second.base_url}/v1/completions", json={"model": NAME, "prompt": "x"})
        assert refused.status_code == 404 and "rank 0" in refused.json()["error"]

        second.proc.kill()  # the pod's server; its rank follows it out
        started = time.monotonic()
        while live(first):
            assert time.monotonic() - started < 10, "rank 0 still live 10 s after losing rank 1"
            time.sleep(0.1)
        assert wait_exit(first, 15) == 1, first.logs()
        assert "lost a rank" in first.logs()
    finally:
        first.stop(5)
        second.stop(5)


def test_sigterm_on_rank_0_stops_every_rank_with_exit_0(server_process):
    first, second = pod_pair(server_process)
    first.proc.send_signal(signal.SIGTERM)
    assert wait_exit(first, 30) == 0, first.logs()
    assert wait_exit(second, 30) == 0, second.logs()
    assert "rank 0 stopped the replica" in second.logs()


def test_heads_that_do_not_split_over_the_ranks_fail_the_start_naming_them(server_process, tmp_path):
    import dataclasses

    from model_runtime.models.builtin import random_model
    from model_runtime.models.config import ModelConfig
    from model_runtime.models.loading import save_checkpoint

    cfg = dataclasses.replace(
        ModelConfig.from_name("tiny-mixtral"), num_attention_heads=3, num_key_value_heads=1
    )
    save_checkpoint(random_model(cfg), tmp_path)
    server = server_process(
        "--tensor-parallel-size", "2", "--device", "cpu", model=str(tmp_path), startup_timeout_s=None
    )
    assert wait_exit(server, 60) == 1, server.logs()
    assert "3 attention heads cannot be split evenly over --tensor-parallel-size 2" in server.logs()


def test_flags_that_do_not_fit_together_are_refused(server_process):
    for flags, message in [
        (("--tensor-parallel-size", "3", "--nnodes", "2"), "not divisible by --nnodes 2"),
        (("--nnodes", "2", "--master-port", "1234"), "--nnodes 2 needs --tensor-parallel-size"),
        (("--tensor-parallel-size", "2", "--nnodes", "2"), "needs --master-port"),
        (("--tensor-parallel-size", "2", "--no-engine-process"), "needs the engine process"),
    ]:
        server = server_process(*flags, model=MODEL, startup_timeout_s=None)
        assert wait_exit(server, 30) == 2, server.logs()
        assert message in server.logs()
