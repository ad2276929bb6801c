"""model_runtime: the project's PyTorch MoE runtime (models, loading, engine, servers)."""

from .config import ModelConfig
from .loading import CheckpointError, load_model
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["CheckpointError", "ModelConfig", "Tokenizer", "load_model", "load_tokenizer"]
