"""The model stage: ModelConfig and the architectures table, the Transformer, the paged-step
interface, loading checkpoints and builtins, tokenizers. Nothing here knows the engine or servers."""
