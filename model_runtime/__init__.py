"""model_runtime: the project's PyTorch MoE runtime, in packages by stage, each importing only the
ones before it: models (config, architectures, model, loading, tokenizers) <- kernels (transforms
of a built model) <- engine (batching, the engine process) <- serving (HTTP, gRPC, metrics) <- cli.
"""

from model_runtime.models.config import ModelConfig
from model_runtime.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CheckpointError", "ModelConfig", "Tokenizer", "load_model", "load_tokenizer"]


def __getattr__(name: str):
    # torch is imported on first use of the loader, not with the package: the server process, which
    # imports this package, never loads a model (the engine process does)
    if name in ("CheckpointError", "load_model"):
        from model_runtime.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
