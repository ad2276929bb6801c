"""The process: CLI, controller (work queue), kopf handlers, HTTP server (/alerts, /metrics, /healthz),
permissions, metrics, and the kubectl plugin."""
