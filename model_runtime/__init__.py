"""model_runtime: the project's PyTorch MoE runtime (models, loading, engine, servers)."""

from model_runtime.models.config import ModelConfig
from model_runtime.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CheckpointError", "ModelConfig", "Tokenizer", "load_model", "load_tokenizer"]


def __getattr__(name: str):
    # torch is imported on first use of the loader, not with the package: the server process starts
    # its engine process before it imports torch itself, so the two imports overlap
    if name in ("CheckpointError", "load_model"):
        from model_runtime.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
