# moe-operator: every target installs what it needs, idempotently (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help setup tools test test-unit test-runtime test-cluster test-e2e demo demo-gitops run bench lint \
        cluster-up cluster-down images chart-crds gpu-check

help:
	@echo "make demo    local cluster + operator + a canary rolled back on a latency alert"
	@echo "make demo-gitops   the same story driven from Git, synced by Flux on the local cluster"
	@echo "make test    the whole suite (unit, runtime, cluster, e2e)"
	@echo "make run     local cluster, CRDs, operator in the foreground"
	@echo "make bench   runtime and rollout benchmarks (prints tables)"
	@echo "make setup | tools | lint | cluster-up | cluster-down | images"

# The virtualenv; a CPU-only torch wheel in /opt/wheels is used when the machine carries one.
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	if ls /opt/wheels/torch-*+cpu-*.whl >/dev/null 2>&1; then \
		$(PY) -m pip install -q /opt/wheels/torch-*+cpu-*.whl; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Cluster binaries (kube-apiserver & co., etcd, kwok, helm) built from the Go module proxy into a
# cache outside the repository, plus Prometheus and Alertmanager from Debian's packages.
tools: setup
	$(PY) -m devcluster build

test: setup tools
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-runtime: setup
	$(PY) -m pytest -m runtime $(PYTEST_ARGS)

# The runtime on CUDA (placement per local rank, bf16 against fp32, NCCL ranks); needs a GPU.
gpu-check: setup
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
	$(PY) -m pytest -m gpu -v tests/gpu $(PYTEST_ARGS)
	$(PY) -m benchmarks.runtime_gpu_attention

test-cluster: setup tools
	$(PY) -m pytest -m cluster $(PYTEST_ARGS)

test-e2e: setup tools
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

cluster-up: setup tools
	$(PY) -m devcluster up --monitoring

cluster-down: setup
	$(PY) -m devcluster down

lint: setup
	$(VENV)/bin/ruff check .

# Local cluster up, CRDs installed, the operator in the foreground (Ctrl-C stops the operator only;
# `make cluster-down` stops the cluster).
run: setup tools
	$(PY) -m devcluster up --monitoring
	eval "$$($(PY) -m devcluster env)" && kubectl apply --server-side --force-conflicts -f crds/modeldeployments.yaml \
	  && kubectl wait --for=condition=Established --timeout=60s crd/modeldeployments.serving.moe.dev
	@echo; echo "In a second terminal:"; $(PY) -m devcluster env | sed 's/^/  /'; \
	  echo "  kubectl apply -f examples/tiny-cpu.yaml && kubectl get md -w"; echo
	$(VENV)/bin/moe-operator run --all-namespaces --host 127.0.0.1 --kubeconfig .devcluster/kubeconfig

# Benchmarks print their tables; their targets are checked here, never in timed tests.
# runtime_vs_vllm runs where the vLLM peer is installed (`$(PY) -m benchmarks.vllm_peer install`)
# and otherwise prints how to install it.
bench: setup tools
	$(PY) -m benchmarks.runtime_decode
	$(PY) -m benchmarks.runtime_http
	$(PY) -m benchmarks.runtime_parallel
	$(PY) -m benchmarks.runtime_fp8
	$(PY) -m benchmarks.runtime_vs_vllm
	$(PY) -m benchmarks.runtime_prefix_cache
	$(PY) -m benchmarks.rollback --trials 12
	$(PY) -m benchmarks.operator_scale

# The demo (README): cluster with monitoring, operator, load, a bad canary rolled back on a latency
# alert, a good revision promoted; ends with one summary line and leaves the cluster running.
demo: setup tools
	$(PY) -m devtools.demo

# The demo driven from Git: the cluster with Flux (built the first time, ~13 min on 2 cores) and a Git
# server on loopback; each change is a commit that Flux applies (docs/gitops.md).
demo-gitops: setup tools
	$(PY) -m devtools.demo --gitops

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

# The chart's copy of the CRD (tests/unit/test_chart*.py fails when it differs from crds/).
chart-crds:
	cp crds/modeldeployments.yaml charts/moe-operator/files/crds/modeldeployments.yaml

# Container images. Needs a Docker engine, which this project's development machines lack.
images:
	docker build -f operator/Dockerfile -t ghcr.io/moe-operator/operator:$(VERSION) .
	docker build -f model_runtime/Dockerfile -t ghcr.io/moe-operator/runtime:$(VERSION) .
