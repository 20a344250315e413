#!/usr/bin/env bash
# Install foundry-sglang for development and CI: torch, SGLang 0.5.23 (pure-Python wheel, its light
# dependencies only: no sglang-kernel/flashinfer, which need a GPU build), Ray, and this package (editable).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# SGLang 0.5.23 pins torch 2.14.1; on machines where that wheel is not at hand any torch >= 2.6 works for
# foundry itself (SGLang plugin tests then skip).
$PY -m pip install -q "torch==2.14.1" || $PY -m pip install -q "torch>=2.6"
$PY -m pip install -q -e ".[dev]"  # includes ruff, which .ci/run uses to lint
# SGLang without its GPU-only dependency tree; these light packages are what importing its graph-runner,
# plugin and server-args modules needs.
$PY -m pip install -q --no-deps "sglang==0.5.23" || echo "setup: sglang 0.5.23 not installable here; plugin tests will skip"
$PY -m pip install -q orjson psutil pybase64 requests packaging pillow starlette pydantic pyzmq ipython \
    transformers dill apache-tvm-ffi sentencepiece compressed-tensors gguf einops openai partial-json-parser \
    "torchvision==0.29.1" || echo "setup: some SGLang light dependencies failed to install"
$PY -c "import foundry_core, foundry_sglang; print('foundry-sglang installed')"
