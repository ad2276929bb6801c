"""The engine stage: continuous batching over a paged KV cache (LLMEngine), and the fronts that
stream its outputs to a server, from a thread or from a child process.

Empty on purpose: the server process imports the torch-free modules here (config, requests,
messages, front, process, worker) without importing torch."""
