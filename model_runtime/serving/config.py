"""The server's settings (what `moe-runtime serve`'s flags set), and the names its answers carry."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_runtime.distributed.config import ParallelConfig
from model_runtime.serving.signature import MODEL_VERSION

VERSION = "0.1.0"
REVISION_HEADER = "x-moe-revision"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class ServerConfig:
    model: str
    served_model_name: str | None = None
    host: str | None = None  # None: $POD_IP (plus 127.0.0.1) when set, else 0.0.0.0
    http_port: int = 8000
    grpc_port: int = 8001
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16 matmul, else float32
    device: str = "auto"
    quantization: str | None = None  # "int8": weight-only int8
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    max_waiting: int = 256
    enable_prefix_caching: bool = True  # reuse KV blocks of common prompt prefixes (engine/block_manager.py)
    kv_cache_memory_bytes: int | None = None  # None: from the device's memory (CUDA) or 256 MiB (CPU)
    gpu_memory_utilization: float | None = None  # None: 0.9 on CUDA; on the CPU, the fixed size
    max_step_attention_bytes: int = 2**30  # one layer's attention memory in one step
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 25.0
    max_body_bytes: int = 4 * 2**20
    inject_latency_ms: float = 0.0
    inject_error_rate: float = 0.0
    seed: int | None = None
    engine_process: bool = True  # the engine steps in a child process (else in a thread of this one)
    revision: str | None = None  # the ModelDeployment revision this pod serves ($MOE_REVISION)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # the replica's ranks and pods

    @property
    def model_name(self) -> str:
        return self.served_model_name or default_model_name(self.model)

    @property
    def model_version(self) -> str:
        """The served model's one KServe version: the revision, where the pod has one."""
        return self.revision or MODEL_VERSION

    @property
    def revision_headers(self) -> list[tuple[str, str]]:
        """Headers (and gRPC metadata) every answer carries: `x-moe-revision`, where set."""
        return [(REVISION_HEADER, self.revision)] if self.revision else []


def default_model_name(source: str) -> str:
    """`builtin:tiny-mixtral` -> `tiny-mixtral`; `hf://org/name@rev` -> `name`; a path -> its last part."""
    name = source.split(":", 1)[1] if source.startswith("builtin:") else source
    name = name.split("@", 1)[0].rstrip("/")
    return name.rsplit("/", 1)[-1] or "model"
