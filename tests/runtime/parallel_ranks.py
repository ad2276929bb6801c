"""Running one tensor / expert parallel replica's ranks as local processes, for test_parallel.py.

Not a test module: the rank processes (spawned, so they import this file fresh) need only torch
and model_runtime, not pytest or transformers. Each launch runs every check of one (checkpoint,
world, expert parallel) combination in its ranks and sends each rank's results back:

    logits      the float32 logits of `mixed_steps` (a paged prefill step, then a mixed step)
    greedy      the greedy tokens of `greedy_paged`
    reads       every checkpoint key the loader passed to get_slice / get_tensor
    weight_bytes, experts (first, count) of this rank's routed experts
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import time
import traceback

import torch

from model_runtime.models.paged import build_paged_batch

BLOCK_SIZE = 4


def mixed_schedule(prompts: dict[str, list[int]]) -> list[list[tuple[str, int, int]]]:
    """Two steps of (sequence, tokens cached, new tokens): B's first chunk and C's and D's whole
    prompts; then A's whole prompt, B's second chunk over its cached tokens and one decode each
    of C and D."""
    b_first = len(prompts["B"]) // 2 + 1
    return [
        [("B", 0, b_first), ("C", 0, len(prompts["C"])), ("D", 0, len(prompts["D"]))],
        [
            ("A", 0, len(prompts["A"])),
            ("B", b_first, len(prompts["B"]) - b_first),
            ("C", len(prompts["C"]), 1),
            ("D", len(prompts["D"]), 1),
        ],
    ]


def mixed_contexts(prompts, decoded) -> list[list[list[int]]]:
    """The whole token sequence whose last position each logits row of `mixed_steps` is for."""
    full = {name: list(p) + ([decoded[name]] if name in decoded else []) for name, p in prompts.items()}
    return [[full[name][: cached + new] for name, cached, new in step] for step in mixed_schedule(prompts)]


def mixed_steps(model, prompts, decoded) -> list[torch.Tensor]:
    """The logits [S, V] of each step of `mixed_schedule`, through forward_paged and one paged KV
    cache whose blocks are handed out out of order (sequences interleave in the cache)."""
    full = {name: list(p) + ([decoded[name]] if name in decoded else []) for name, p in prompts.items()}
    need = {name: -(-len(tokens) // BLOCK_SIZE) for name, tokens in full.items()}
    total = sum(need.values()) + 3  # a few blocks no sequence uses
    ids = torch.randperm(total, generator=torch.Generator().manual_seed(0)).tolist()  # out of order
    blocks = {}
    for name in sorted(full):
        blocks[name], ids = ids[: need[name]], ids[need[name] :]
    cache = model.allocate_kv_cache(total, BLOCK_SIZE)
    out = []
    with torch.no_grad():
        for step in mixed_schedule(prompts):
            batch = build_paged_batch([(blocks[n], cached, new) for n, cached, new in step], BLOCK_SIZE)
            tokens = torch.tensor([t for n, cached, new in step for t in full[n][cached : cached + new]])
            out.append(model.forward_paged(tokens, batch, cache))
    return out


def greedy_paged(model, prompt, steps, block_size=8):
    """Greedy decoding through forward_paged: one prefill step, then one token per step (as
    test_equivalence.greedy_paged)."""
    blocks = list(range((len(prompt) + steps + block_size - 1) // block_size))
    cache = model.allocate_kv_cache(len(blocks), block_size)
    tokens, out = list(prompt), []
    with torch.no_grad():
        batch = build_paged_batch([(blocks, 0, len(prompt))], block_size)
        logits = model.forward_paged(torch.tensor(prompt), batch, cache)
        for _ in range(steps):
            out.append(int(logits[0].argmax()))
            tokens.append(out[-1])
            batch = build_paged_batch([(blocks, len(tokens) - 1, 1)], block_size)
            logits = model.forward_paged(torch.tensor(tokens[-1:]), batch, cache)
    return out


# ---- recording what the loader reads -----------------------------------------------------------


class _RecordingHandle:
    def __init__(self, handle, reads: list[str]):
        self._handle, self._reads = handle, reads

    def __enter__(self):
        self._inner = self._handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self._handle.__exit__(*exc)

    def get_slice(self, key):
        self._reads.append(key)
        return self._inner.get_slice(key)

    def get_tensor(self, key):
        self._reads.append(key)
        return self._inner.get_tensor(key)

    def __getattr__(self, name):  # keys(), metadata(), ...
        return getattr(self._inner, name)


def record_reads(loading_module) -> list[str]:
    """Replace the loader's safe_open with one whose handles record each key read; the list fills
    as the loader reads."""
    real, reads = loading_module.safe_open, []
    loading_module.safe_open = lambda *a, **kw: _RecordingHandle(real(*a, **kw), reads)
    return reads


# ---- one rank ----------------------------------------------------------------------------------


def rank_main(rank, world, port, src, ep, job, results) -> None:
    torch.set_num_threads(1)
    out = {"rank": rank}
    comm = None
    try:
        from model_runtime.distributed.comm import init_comm
        from model_runtime.distributed.config import ParallelConfig
        from model_runtime.models import loading
        from model_runtime.models.model import MoE

        reads = record_reads(loading)
        parallel = ParallelConfig(
            tensor_parallel_size=world,
            master_port=port,
            enable_expert_parallel=ep,
            timeout_s=60,
            join_timeout_s=60,
        )
        comm = init_comm(parallel, rank, torch.device("cpu"))
        model = loading.load_model(src, shard=comm.shard(ep), comm=comm)
        moe = [layer.mlp.experts for layer in model.layers if isinstance(layer.mlp, MoE)]
        out.update(
            reads=list(reads),
            weight_bytes=model.weight_bytes(),
            experts=sorted({(e.first_expert, e.num_local_experts) for e in moe}),
            logits=[t.numpy() for t in mixed_steps(model, job["prompts"], job["decoded"])],
            greedy=greedy_paged(model, job["greedy_prompt"], job["greedy_steps"]),
        )
    except BaseException:
        out["error"] = traceback.format_exc()
    results.put(out)
    if comm is not None and "error" not in out:
        comm.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(src, world: int, ep: bool, job: dict, timeout_s: float = 150.0) -> list[dict]:
    """Run `world` rank processes over `src` and return their results in rank order. Raises if a
    rank fails or the ranks are not done within timeout_s; every process is gone on return. A
    launch whose free port was taken before rank 0 bound it is retried once on another."""
    try:
        return _launch(src, world, ep, job, timeout_s)
    except RuntimeError as e:
        if "address already in use" not in str(e).lower():
            raise
    return _launch(src, world, ep, job, timeout_s)


def _launch(src, world: int, ep: bool, job: dict, timeout_s: float) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, str(src), ep, job, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world:
            try:
                out = results.get(timeout=1.0)
            except queue.Empty:
                missing = sorted(set(range(world)) - set(got))
                dead = [r for r in missing if procs[r].exitcode not in (None, 0)]
                if dead:
                    codes = [procs[r].exitcode for r in dead]
                    raise RuntimeError(
                        f"{src} world {world} ep {ep}: ranks {dead} died (exit codes {codes})"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{src} world {world} ep {ep}: ranks {missing} gave no result within {timeout_s}s"
                    ) from None
                continue
            got[out["rank"]] = out
            if "error" in out:
                raise RuntimeError(f"{src} world {world} ep {ep}: rank {out['rank']} failed:\n{out['error']}")
        for p in procs:
            p.join(max(deadline - time.monotonic(), 5))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    return [got[r] for r in range(world)]
