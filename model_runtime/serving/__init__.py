"""The serving stage: InferenceService (admission, limits, metrics, drain) and its front ends:
KServe v2 and OpenAI over HTTP, KServe v2 over gRPC, Prometheus metrics; `serve()` runs them."""
