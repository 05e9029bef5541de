#!/usr/bin/env bash
# Build the separate venv in which the SGLang adapter's conformance tests run.
#
# Why a separate venv: real SGLang needs torch, and the main .venv must never get torch (a
# plain `pip install sglang` pulls a multi-GB CUDA build). Here torch is the CPU build that
# lies on the machine's disk, sglang is installed WITHOUT its dependencies, and only what
# `sglang.srt.server_args` imports is added -- enough to build real ServerArgs and to read
# the engine's source, which is all a GPU-free conformance test can do. `triton` (1 GB) is
# replaced by a stand-in in tests/conformance/stubs, put on PYTHONPATH by the test command.
#
# Usage: scripts/install-sglang-conformance.sh [VENV_DIR]   (default: .venv-sglang)
# Then:  PYTHONPATH=tests/conformance/stubs VENV_DIR/bin/pytest -q tests/conformance
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-sglang}"
PY="${PY:-python3}"
TORCH_VERSION="2.13.0"
SGLANG_VERSION="0.5.23"
# What `from sglang.srt.server_args import ServerArgs` imports (besides torch and triton).
SERVER_ARGS_DEPS=(
    numpy orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic
    pyzmq tqdm ipython aiohttp pyyaml
)
# This project's runtime dependencies (installed explicitly: the project goes in --no-deps)
# and the test runner with the plugins pyproject.toml configures.
PROJECT_DEPS=(
    "msgspec>=0.19" "nats-py>=2.9" "aetcd>=1.0" "uvloop>=0.19" "prometheus-client>=0.20"
    "pyzmq>=26" "aiohttp>=3.9" "xxhash>=3" "pytest>=8" "pytest-asyncio>=0.23" "pytest-timeout>=2.3"
)

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'install-sglang-conformance: error: %s\n' "$*" >&2; exit 1; }

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# torch must be the local CPU wheel. Resolve first without installing, and refuse if pip
# would download torch (or any CUDA runtime package) from an index: that is a multi-GB CUDA
# build that does not belong on this machine.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    say "resolving torch==$TORCH_VERSION (must come from a local file)"
    report="$(mktemp)"
    trap 'rm -f "$report"' EXIT
    "${PIP[@]}" install -q --dry-run --ignore-installed --report "$report" "torch==$TORCH_VERSION"
    "$VENV/bin/python" - "$report" <<'EOF' || die "refusing to install torch from an index (see above)"
import json, sys

report = json.load(open(sys.argv[1]))
bad = []
for item in report["install"]:
    name = item["metadata"]["name"].lower()
    url = item.get("download_info", {}).get("url", "")
    if name == "torch":
        print(f"    torch {item['metadata']['version']} from {url}", file=sys.stderr)
        if not url.startswith("file:") or "+cpu" not in item["metadata"]["version"]:
            bad.append(f"torch would come from {url} ({item['metadata']['version']})")
    elif name.startswith(("nvidia-", "triton", "cuda-")):
        bad.append(f"{name} would be installed ({url})")
for line in bad:
    print(f"install-sglang-conformance: {line}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
    say "installing torch==$TORCH_VERSION (CPU build)"
    "${PIP[@]}" install -q "torch==$TORCH_VERSION"
fi

say "installing sglang==$SGLANG_VERSION without its dependencies"
"${PIP[@]}" install -q --no-deps "sglang==$SGLANG_VERSION"

say "installing what sglang.srt.server_args imports"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "${SERVER_ARGS_DEPS[@]}"

say "installing sglmesh (editable, no deps) and its runtime + test dependencies"
"${PIP[@]}" install -q "torch==$TORCH_VERSION" "${PROJECT_DEPS[@]}"
"${PIP[@]}" install -q --no-deps -e "$ROOT"

# A CUDA torch sneaking in through any of the steps above would be a silent 5 GB mistake.
"$VENV/bin/python" - <<EOF || die "torch in $VENV is not the $TORCH_VERSION CPU build"
import torch, sys
print(f"    torch {torch.__version__}, cuda={torch.version.cuda}", file=sys.stderr)
sys.exit(0 if torch.__version__.startswith("$TORCH_VERSION") and torch.version.cuda is None else 1)
EOF

say "checking that ServerArgs imports (with the triton stand-in)"
PYTHONPATH="$ROOT/tests/conformance/stubs" "$VENV/bin/python" -c \
    "from sglang.srt.server_args import ServerArgs; print('    ServerArgs OK')" >&2

end=$(date +%s)
size=$(du -sh "$VENV" | cut -f1)
say "done in $((end - start)) s; $VENV is $size"
say "run: PYTHONPATH=tests/conformance/stubs $VENV/bin/pytest -q tests/conformance"
