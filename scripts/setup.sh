#!/usr/bin/env bash
# Install foundry-sglang for development and CI: torch, SGLang 0.5.23 (pure-Python wheel, its light
# dependencies only: no sglang-kernel/flashinfer, which need a GPU build), Ray, and this package (editable).
# Every step must succeed: a missing SGLang or transformers would silently skip the plugin tests and the
# independent numeric reference, so a failed install stops here with the step that failed.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
step() { echo "setup: $*"; }
fail() { echo "setup: error: $*" >&2; exit 1; }
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true   # an old pip still works
# An earlier editable install leaves foundry_sglang.egg-info here; `python -m pip` run from this folder sees it as
# an installed foundry-sglang and, in a new environment, prints a resolver "ERROR" about its missing dependencies.
# The editable install below writes it again.
rm -rf foundry_sglang.egg-info
# SGLang 0.5.23 pins torch 2.14.1; where that wheel is not at hand any torch >= 2.6 works for foundry and
# for the parts of SGLang the tests import (SGLang is installed without its dependency pins below).
step "torch"
$PY -m pip install -q "torch==2.14.1" || $PY -m pip install -q "torch>=2.6" || fail "torch could not be installed"
step "foundry-sglang (editable, with dev extras: pytest, hypothesis, requests, ray[serve], ruff)"
$PY -m pip install -q -e ".[dev]" || fail "foundry-sglang could not be installed"
# SGLang without its GPU-only dependency tree: first the light packages that importing its graph-runner, plugin
# and server-args modules needs, then SGLang itself with --no-deps, as the last pip step. In that order pip has no
# reason to list SGLang's ~50 unmet GPU pins (flashinfer, sglang-kernel, ...) in an "ERROR: pip's dependency
# resolver ..." block: it prints that block after installing a package SGLang depends on while SGLang is already
# there, and never for a --no-deps install.
step "SGLang's light dependencies and transformers"
$PY -m pip install -q orjson psutil pybase64 requests packaging pillow starlette pydantic pyzmq ipython \
    transformers dill apache-tvm-ffi sentencepiece compressed-tensors gguf einops openai partial-json-parser \
    "torchvision==0.29.1" || fail "SGLang's light dependencies (incl. transformers) could not be installed"
step "sglang 0.5.23 (no dependencies)"
$PY -m pip install -q --no-deps "sglang==0.5.23" || fail "sglang 0.5.23 could not be installed"
$PY -c "import foundry_core, foundry_sglang, ray, transformers, sglang.srt.server_args, sglang.srt.plugins" \
    || fail "an installed package does not import (see the error above)"
echo "foundry-sglang installed"
