"""`moe-runtime`: the runtime's command line (`moe-runtime serve --model SRC ...`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys

from model_runtime.distributed.config import ParallelConfig
from model_runtime.serving.config import LOG_FORMAT, ServerConfig

GIL_SWITCH_INTERVAL_S = 0.02

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "KI": 2**10,
    "MI": 2**20,
    "GI": 2**30,
    "TI": 2**40,
}
_REVISION = re.compile(r"^[\x21-\x7e]{1,253}$")


def parse_size(text: str) -> int:
    """Bytes from `268435456`, `256Mi`, `2Gi`, `1.5GB` (Kubernetes-style suffixes)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 268435456, 256Mi, 2Gi)")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return int(float(match.group(1)) * _UNITS[unit])


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _utilization(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction of the device's memory), got {text}")
    return value


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0 bytes, got {text}")
    return value


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {text} (0..65535; 0 picks a free one)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _revision(text: str) -> str | None:
    """A revision name, or None for "" (no revision). It goes out in an HTTP header and in gRPC
    metadata, so it is visible ASCII with no spaces (every Kubernetes label value is)."""
    if not text:
        return None
    if not _REVISION.match(text):
        raise argparse.ArgumentTypeError(
            f"not a revision: {text!r} (1 to 253 visible ASCII characters, no spaces; e.g. a revision label)"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-runtime", description="The moe-operator MoE model runtime.")
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser(
        "serve",
        help="serve a model over HTTP (KServe v2, generate, OpenAI) and gRPC (KServe v2)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument(
        "--model",
        required=True,
        help="a Hugging Face checkpoint directory, or builtin:tiny-mixtral | builtin:tiny-qwen3-moe | "
        "builtin:tiny-deepseek-v3",
    )
    s.add_argument("--served-model-name", help="the model name clients use (default: from --model)")
    s.add_argument(
        "--host", help="address to bind (default: $POD_IP, plus 127.0.0.1 where free; else 0.0.0.0)"
    )
    s.add_argument("--http-port", type=_port, default=8000)
    s.add_argument("--grpc-port", type=_port, default=8001)
    s.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights and KV cache (auto: bfloat16 on CUDA and on CPUs with native bfloat16 matmul (AMX, "
        "AVX512-BF16, Arm BF16), float32 on other CPUs; the engine logs which and why)",
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    s.add_argument("--quantization", choices=["int8"], default=None, help="weight-only quantization")
    s.add_argument("--max-num-seqs", type=_positive_int, default=32, help="sequences in one engine step")
    s.add_argument(
        "--max-num-batched-tokens", type=_positive_int, default=2048, help="new tokens in one engine step"
    )
    s.add_argument(
        "--max-model-len",
        type=_positive_int,
        default=None,
        help="prompt + output tokens per request (default: the model's length)",
    )
    s.add_argument(
        "--max-waiting",
        type=_positive_int,
        default=256,
        help="queued requests beyond which new ones get 429 / RESOURCE_EXHAUSTED",
    )
    s.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache blocks of prompt prefixes earlier requests computed (vLLM's automatic "
        "prefix caching; on by default, as in vLLM v1); moe_prefix_cache_queries_total and "
        "moe_prefix_cache_hits_total count the prompt tokens looked up and found",
    )
    m = s.add_argument_group(
        "memory",
        "The KV cache is sized at start and reported in a log line and in moe_kv_cache_capacity_tokens. "
        "One step's attention (each sequence's whole context gathered, padded to the longest, and the "
        "scores) is budgeted per layer; a step that still runs out of memory is retried in halves and "
        "fails only the requests that cannot run alone (one process; a replica over several ranks exits).",
    )
    m.add_argument(
        "--gpu-memory-utilization",
        type=_utilization,
        default=None,
        help="fraction of the device's memory the engine may use, as vLLM (None: 0.9 on CUDA): after a "
        "profiling pass the KV cache gets util x total memory less this process's peak (weights and a "
        "full step), less what is used outside torch and the step attention budget, and never more than "
        "is free. On the CPU the KV cache stays 256Mi unless this is given; then util x (the host's "
        "available memory (MemAvailable, or what the cgroup's limit leaves) + the weights) less the "
        "weights and an estimate of a step's peak, at most 64Gi",
    )
    m.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=None,
        help="the KV cache's size (e.g. 256Mi, 8Gi); given, it wins over --gpu-memory-utilization "
        "(None: sized from the device's memory on CUDA, 256Mi on the CPU)",
    )
    m.add_argument(
        "--max-step-attention-memory",
        type=_positive_size,
        default="1Gi",
        help="the most one layer's attention may take in one step (gathered contexts and scores, "
        "estimated): the scheduler fits each step's sequences and prefill chunks under it, and refuses "
        "a request whose context alone exceeds it (400); on CUDA it is reserved beside the KV cache",
    )
    s.add_argument(
        "--request-timeout",
        type=_non_negative(float),
        default=600.0,
        help="seconds a request may run before it fails with 408 / DEADLINE_EXCEEDED",
    )
    s.add_argument(
        "--drain-timeout",
        type=_non_negative(float),
        default=25.0,
        help="seconds SIGTERM waits for requests in flight before exiting (keep it below the pod's "
        "terminationGracePeriodSeconds, 30 by default)",
    )
    s.add_argument(
        "--max-body-bytes", type=parse_size, default=4 * 2**20, help="largest request body (413 above)"
    )
    s.add_argument(
        "--inject-latency-ms",
        type=_non_negative(float),
        default=0.0,
        help="fault injection: milliseconds added before every request's first token",
    )
    s.add_argument(
        "--inject-error-rate",
        type=_fraction,
        default=0.0,
        help="fault injection: fraction of requests failed with an injected error",
    )
    s.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the engine's step loop in a child process, so that serving never waits on it for "
        "Python's GIL (--no-engine-process: in a thread of the server's process)",
    )
    s.add_argument(
        "--revision",
        type=_revision,
        default=os.environ.get("MOE_REVISION"),
        help="the ModelDeployment revision this pod serves (default: $MOE_REVISION, which the operator "
        "sets): the x-moe-revision header of every HTTP answer and gRPC call, and the model's version "
        "in its metadata",
    )
    p = s.add_argument_group(
        "distributed (one replica over several devices and pods; vLLM's names)",
        "N ranks serve one replica, spread over K pods with N/K processes each (one per device; "
        "gloo with --device cpu). Rank 0's pod serves HTTP/gRPC; the others answer health and /metrics.",
    )
    p.add_argument(
        "--tensor-parallel-size", type=_positive_int, default=1, help="ranks of one replica (N)"
    )
    p.add_argument(
        "--enable-expert-parallel",
        action="store_true",
        help="each rank runs its own range of the routed experts (else every expert is tensor-split)",
    )
    p.add_argument(
        "--nnodes",
        type=_positive_int,
        default=None,
        help="pods the ranks are spread over (K; default with N > 1: $MOE_WORLD_SIZE, else 1)",
    )
    p.add_argument(
        "--node-rank",
        type=_non_negative(int),
        default=None,
        help="this pod's index among the K (default with N > 1: $MOE_RANK, else 0); pod 0 holds rank 0",
    )
    p.add_argument(
        "--master-addr", default="127.0.0.1", help="rank 0's pod address, where the ranks meet"
    )
    p.add_argument(
        "--master-port",
        type=_port,
        default=None,
        help="the port the ranks meet on at --master-addr (default with one pod: a free one)",
    )
    p.add_argument(
        "--distributed-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a collective may wait: a rank that stops answering for longer is lost, and the "
        "replica stops (not live) and exits",
    )
    s.add_argument("--seed", type=int, default=None, help="seed of unseeded sampling (default: random)")
    s.add_argument(
        "--log-level",
        default=os.environ.get("MOE_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
    )
    return parser


def parallel_from_args(args: argparse.Namespace, environ=os.environ) -> ParallelConfig:
    """The replica's layout from the flags; with N > 1 ranks, the operator's $MOE_WORLD_SIZE (pods
    per replica) and $MOE_RANK (this pod's index) stand in for --nnodes and --node-rank.
    ValueError saying what is inconsistent."""
    n = args.tensor_parallel_size
    nnodes, node_rank = args.nnodes, args.node_rank
    if n > 1:
        nnodes = nnodes if nnodes is not None else _env_int(environ, "MOE_WORLD_SIZE", 1)
        node_rank = node_rank if node_rank is not None else _env_int(environ, "MOE_RANK", 0)
    nnodes, node_rank = nnodes or 1, node_rank or 0
    if n == 1 and nnodes > 1:
        raise ValueError(f"--nnodes {nnodes} needs --tensor-parallel-size N, a multiple of it (N ranks over the pods)")
    if n > 1 and not args.engine_process:
        raise ValueError("--tensor-parallel-size > 1 needs the engine process (drop --no-engine-process)")
    master_port = args.master_port
    if master_port is None and nnodes == 1 and n > 1:
        from model_runtime.distributed.ranks import free_port

        master_port = free_port(args.master_addr)
    return ParallelConfig(
        tensor_parallel_size=n,
        enable_expert_parallel=args.enable_expert_parallel,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=args.master_addr,
        master_port=master_port,
        timeout_s=args.distributed_timeout,
    )


def _env_int(environ, name: str, default: int) -> int:
    value = environ.get(name, "")
    if not value:
        return default
    if not value.isdigit():
        raise ValueError(f"${name} is {value!r}, not a number")
    return int(value)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_waiting=args.max_waiting,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_step_attention_bytes=args.max_step_attention_memory,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        max_body_bytes=args.max_body_bytes,
        inject_latency_ms=args.inject_latency_ms,
        inject_error_rate=args.inject_error_rate,
        seed=args.seed,
        engine_process=args.engine_process,
        revision=args.revision,
        parallel=parallel_from_args(args),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if not config.engine_process:
        # The engine steps in a thread beside the event loop; with CPython's default 5 ms switch
        # interval the two hand the GIL back and forth so often that streaming HTTP halves the
        # engine's throughput. A longer interval (the engine thread still yields the GIL on every
        # torch op) measured about 2x more streamed tokens/s (benchmarks.runtime_http).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Imported here, not with this module: the engine process (multiprocessing's spawn) runs this
    # module's imports again before it imports torch, and needs none of the web stack (FastAPI,
    # gRPC, uvicorn: most of a second).
    from model_runtime.serving.server import serve

    try:
        code = asyncio.run(serve(config, pod_ip=os.environ.get("POD_IP") or None))
    except OSError as e:  # a port in use, an address not on this machine
        logging.getLogger("model_runtime.server").error("cannot listen: %s", e)
        code = 1
    # Everything the server owns is closed by now, but the interpreter's teardown of native
    # threads (gRPC's, torch's) can take seconds of the pod's grace period: leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
